-- pgbench script: the transaction cqrs-commandd runs for one AdjustStock (+1) without an
-- Idempotency-Key, statement for statement (services/command/product.c: lock, update, append;
-- libcqrs/src/outbox.c: events + outbox + NOTIFY in one statement), on a random bench product.
-- Variables (pgbench -D): products (ids md5(idseed || 1..products)), idseed, topic (the
-- outbox rows' topic: <CQRS_TOPIC_PREFIX>.product.events).
-- (pgbench reads ':name' as a variable, so the timestamp format builds its colons with chr(58).)
\set n random(1, :products)
BEGIN;
SELECT id AS pid, sku, name, description, category, price_cents, currency, stock, status,
       units_sold, version,
       to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24' || chr(58) || 'MI' || chr(58) || 'SS.MS"Z"') AS c,
       to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24' || chr(58) || 'MI' || chr(58) || 'SS.MS"Z"') AS u
  FROM products WHERE id = md5(:idseed::text || :n::int)::uuid FOR UPDATE \gset
UPDATE products SET stock = stock + 1, version = version + 1, updated_at = now()
 WHERE id = :pid::uuid
 RETURNING id, sku, name, description, category, price_cents, currency, stock, status,
           units_sold, version AS v,
           to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24' || chr(58) || 'MI' || chr(58) || 'SS.MS"Z"') AS c,
           to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24' || chr(58) || 'MI' || chr(58) || 'SS.MS"Z"') AS u \gset
WITH x AS (
  SELECT * FROM jsonb_to_recordset(jsonb_build_array(jsonb_build_object(
      'event_id', gen_random_uuid(), 'aggregate_type', 'product',
      'aggregate_id', :pid::uuid,
      'version', :v::bigint,
      'event_type', 'product.stock-adjusted.v1', 'occurred_at', now(),
      'traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
      'data', jsonb_build_object('product_id', :pid::uuid, 'delta', 1,
                                 'reason', 'bench', 'stock', :stock::bigint),
      'topic', :topic::text, 'ord', 0)))
    AS x(event_id uuid, aggregate_type text, aggregate_id uuid, version bigint,
         event_type text, occurred_at timestamptz, traceparent text, data jsonb, topic text,
         ord int))
, e AS (
  INSERT INTO events(event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,
                     traceparent, data)
  SELECT event_id, aggregate_type, aggregate_id, version, event_type, occurred_at, traceparent,
         data FROM x ORDER BY ord
  RETURNING event_id, sequence)
, o AS (INSERT INTO outbox(sequence, topic) SELECT e.sequence, x.topic FROM e JOIN x USING (event_id))
SELECT x.ord, e.sequence, pg_notify('cqrs_outbox', '') FROM e JOIN x USING (event_id);
COMMIT;
