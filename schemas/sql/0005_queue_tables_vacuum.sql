-- The outbox and idempotency_keys are queue-like: rows are inserted and soon deleted. Left to
-- the default autovacuum thresholds (20 % of the table), their indexes fill with dead entries
-- that every relay read has to step over. Vacuum them after a fixed number of changes instead.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                        autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0,
                        autovacuum_analyze_threshold = 5000);
ALTER TABLE relay_inflight SET (autovacuum_vacuum_scale_factor = 0,
                                autovacuum_vacuum_threshold = 1000,
                                autovacuum_vacuum_cost_delay = 0);
ALTER TABLE idempotency_keys SET (autovacuum_vacuum_scale_factor = 0.01,
                                  autovacuum_vacuum_cost_delay = 0);
