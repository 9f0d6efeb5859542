/* eventlog.c — the event log and outbox writes: one statement per command appends its events
 * to the log (kept forever) and their sequences to the outbox, and NOTIFYs the relay (relay.c),
 * all in the command's transaction. */
#include <stdlib.h>

#include "cqrs/outbox.h"
#include "cqrs/util.h"
#include "store_int.h"

cqrs_err_t cqrs_outbox_append(cqrs_tx_t *tx, cqrs_event_t *ev, const char *topic, cqrs_error_t *err)
{
    return cqrs_outbox_append_many(tx, ev, 1, &topic, err);
}

cqrs_err_t cqrs_outbox_append_many(cqrs_tx_t *tx, cqrs_event_t *evs, size_t n,
                                   const char *const *topics, cqrs_error_t *err)
{
    json_t *rows = json_array();
    for (size_t i = 0; i < n; i++) {
        cqrs_event_t *ev = &evs[i];
        json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:I, s:s, s:s, s:s?, s:O, s:s, s:I}",
                                              "event_id", ev->id, "aggregate_type",
                                              ev->aggregate_type, "aggregate_id", ev->aggregate_id,
                                              "version", (json_int_t)ev->version, "event_type",
                                              ev->type, "occurred_at", ev->time, "traceparent",
                                              ev->traceparent[0] ? ev->traceparent : NULL, "data",
                                              ev->data, "topic", topics[i], "ord", (json_int_t)i));
    }
    char *param = json_dumps(rows, JSON_COMPACT);
    json_decref(rows);
    if (!param)
        return cqrs_error_set(err, CQRS_ERR_NOMEM, "cannot serialise events");
    const char *p[] = {param};
    cqrs_rows_t *res = NULL;
    cqrs_err_t rc = cqrs_tx_exec(
        tx,
        "WITH x AS ("
        "  SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(event_id uuid, aggregate_type text,"
        "    aggregate_id uuid, version bigint, event_type text, occurred_at timestamptz,"
        "    traceparent text, data jsonb, topic text, ord int))"
        ", e AS ("
        "  INSERT INTO events(event_id, aggregate_type, aggregate_id, version, event_type,"
        "                     occurred_at, traceparent, data)"
        "  SELECT event_id, aggregate_type, aggregate_id, version, event_type, occurred_at,"
        "         traceparent, data FROM x ORDER BY ord"
        "  RETURNING event_id, sequence)"
        ", o AS (INSERT INTO outbox(sequence, topic)"
        "        SELECT e.sequence, x.topic FROM e JOIN x USING (event_id))"
        "SELECT x.ord, e.sequence, pg_notify('" CQRS_OUTBOX_CHANNEL "', '')"
        "  FROM e JOIN x USING (event_id)",
        1, p, &res, err);
    free(param);
    if (rc == CQRS_ERR_OK) {
        if ((size_t)cqrs_rows_count(res) != n)
            rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "event insert returned %d rows for %zu",
                                cqrs_rows_count(res), n);
        for (int r = 0; rc == CQRS_ERR_OK && r < cqrs_rows_count(res); r++) {
            int64_t ord, seq;
            if (!cqrs_parse_int64(cqrs_rows_get(res, r, 0), &ord) || ord < 0 || (size_t)ord >= n ||
                !cqrs_parse_int64(cqrs_rows_get(res, r, 1), &seq))
                rc = cqrs_error_set(err, CQRS_ERR_INTERNAL, "bad event insert result");
            else
                evs[ord].sequence = seq;
        }
    }
    cqrs_rows_free(res);
    return rc;
}
