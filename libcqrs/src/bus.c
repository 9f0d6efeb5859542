/* bus.c — Kafka helpers: configuration, topic creation, finding the messages of one key. */
#include "cqrs/bus.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cqrs/log.h"
#include "cqrs/util.h"

cqrs_err_t cqrs_bus_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value,
                             cqrs_error_t *err)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        return cqrs_error_set_where(err, CQRS_ERR_CONFIG, name, "kafka %s: %s", name, errstr);
    return CQRS_ERR_OK;
}

static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    /* syslog levels: 0-3 errors, 4 warning, 5-6 info, 7 debug */
    cqrs_log(level <= 3   ? CQRS_LOG_ERROR
             : level == 4 ? CQRS_LOG_WARN
                          : CQRS_LOG_DEBUG,
             buf, "component", "librdkafka", "facility", fac, (char *)NULL);
}

rd_kafka_conf_t *cqrs_bus_conf_new(const char *brokers, const char *client_id, cqrs_error_t *err)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (!conf) {
        cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory");
        return NULL;
    }
    const char *debug = getenv("CQRS_KAFKA_DEBUG");
    if (cqrs_bus_conf_set(conf, "bootstrap.servers", brokers, err) ||
        cqrs_bus_conf_set(conf, "client.id", client_id ? client_id : "cqrs", err) ||
        cqrs_bus_conf_set(conf, "socket.keepalive.enable", "true", err) ||
        (debug && *debug && cqrs_bus_conf_set(conf, "debug", debug, err))) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_log_cb(conf, log_cb);
    return conf;
}

cqrs_err_t cqrs_bus_create_topics(const char *brokers, const char *const *topics, size_t n,
                                  int partitions, int replication, int timeout_ms,
                                  cqrs_error_t *err)
{
    cqrs_err_t rc = CQRS_ERR_OK;
    rd_kafka_t *rk = NULL;
    rd_kafka_NewTopic_t **nt = calloc(n, sizeof *nt);
    rd_kafka_AdminOptions_t *opts = NULL;
    rd_kafka_queue_t *q = NULL;
    rd_kafka_event_t *ev = NULL;
    char errstr[256];

    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "cqrs-admin", err);
    if (!conf || !nt) {
        rc = conf ? cqrs_error_set(err, CQRS_ERR_NOMEM, "out of memory") : CQRS_ERR_CONFIG;
        rd_kafka_conf_destroy(conf);
        goto out;
    }
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        rc = cqrs_error_set(err, CQRS_ERR_CONFIG, "kafka client: %s", errstr);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        nt[i] = rd_kafka_NewTopic_new(topics[i], partitions, replication, errstr, sizeof errstr);
        if (!nt[i]) {
            rc = cqrs_error_set_where(err, CQRS_ERR_CONFIG, topics[i], "topic %s: %s", topics[i],
                                      errstr);
            goto out;
        }
    }
    opts = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_request_timeout(opts, timeout_ms, errstr, sizeof errstr);
    rd_kafka_AdminOptions_set_operation_timeout(opts, timeout_ms, errstr, sizeof errstr);
    q = rd_kafka_queue_new(rk);
    rd_kafka_CreateTopics(rk, nt, n, opts, q);
    ev = rd_kafka_queue_poll(q, timeout_ms + 2000);
    if (!ev) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "kafka did not answer CreateTopics");
        goto out;
    }
    if (rd_kafka_event_error(ev)) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "CreateTopics: %s",
                            rd_kafka_event_error_string(ev));
        goto out;
    }
    const rd_kafka_CreateTopics_result_t *res = rd_kafka_event_CreateTopics_result(ev);
    size_t cnt = 0;
    const rd_kafka_topic_result_t **tr = rd_kafka_CreateTopics_result_topics(res, &cnt);
    for (size_t i = 0; i < cnt; i++) {
        rd_kafka_resp_err_t te = rd_kafka_topic_result_error(tr[i]);
        const char *name = rd_kafka_topic_result_name(tr[i]);
        if (te == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
            continue;
        if (te != RD_KAFKA_RESP_ERR_NO_ERROR) {
            rc = cqrs_error_set_where(err, CQRS_ERR_UNAVAILABLE, name, "topic %s: %s", name,
                                      rd_kafka_topic_result_error_string(tr[i]));
            goto out;
        }
        CQRS_LOG_INFO("topic created", "topic", name);
    }
out:
    if (ev)
        rd_kafka_event_destroy(ev);
    if (q)
        rd_kafka_queue_destroy(q);
    if (opts)
        rd_kafka_AdminOptions_destroy(opts);
    if (nt) {
        for (size_t i = 0; i < n; i++)
            if (nt[i])
                rd_kafka_NewTopic_destroy(nt[i]);
        free(nt);
    }
    if (rk)
        rd_kafka_destroy(rk);
    return rc;
}

static int remaining_ms(int64_t deadline)
{
    int64_t left = deadline - cqrs_monotonic_ms();
    return left < 1 ? 1 : (int)left;
}

/* The ce_id header of a message, compared without copying. */
static bool message_has_id(const rd_kafka_message_t *m, const char *id)
{
    rd_kafka_headers_t *h = NULL;
    const void *val = NULL;
    size_t size = 0;
    return rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR &&
           rd_kafka_header_get_last(h, "ce_id", &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR && val &&
           size == strlen(id) && memcmp(val, id, size) == 0;
}

cqrs_err_t cqrs_bus_locate(const char *brokers, const char *topic, const char *key,
                           const cqrs_bus_scan_t *scan, cqrs_bus_sought_t *sought, size_t n,
                           int32_t *partition, bool *complete, cqrs_error_t *err)
{
    int64_t deadline = cqrs_monotonic_ms() + (scan->budget_ms > 0 ? scan->budget_ms : 1);
    cqrs_err_t rc = CQRS_ERR_OK;
    rd_kafka_t *rk = NULL;
    rd_kafka_topic_t *rkt = NULL;
    const rd_kafka_metadata_t *md = NULL;
    rd_kafka_topic_partition_list_t *l = NULL;
    char errstr[256];
    *partition = -1;
    *complete = false;
    for (size_t i = 0; i < n; i++)
        sought[i].offset = -1;

    rd_kafka_conf_t *conf = cqrs_bus_conf_new(brokers, "cqrs-locate", err);
    if (!conf)
        return CQRS_ERR_CONFIG;
    /* No group: partitions are assigned by hand and nothing is committed; librdkafka's own
     * log lines would only repeat the error returned here. */
    if (cqrs_bus_conf_set(conf, "group.id", "cqrs-locate-unused", err) ||
        cqrs_bus_conf_set(conf, "enable.auto.commit", "false", err) ||
        cqrs_bus_conf_set(conf, "isolation.level", "read_committed", err) ||
        cqrs_bus_conf_set(conf, "enable.partition.eof", "true", err) ||
        cqrs_bus_conf_set(conf, "log_level", "0", err)) {
        rd_kafka_conf_destroy(conf);
        return CQRS_ERR_CONFIG;
    }
    rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        return cqrs_error_set(err, CQRS_ERR_CONFIG, "kafka client: %s", errstr);
    }
    rd_kafka_poll_set_consumer(rk);
    rkt = rd_kafka_topic_new(rk, topic, NULL);
    rd_kafka_resp_err_t ke = rd_kafka_metadata(rk, 0, rkt, &md, remaining_ms(deadline));
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka metadata: %s", rd_kafka_err2str(ke));
        goto out;
    }
    if (md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt < 1) {
        rc = cqrs_error_set(err, CQRS_ERR_NOT_FOUND, "topic %s does not exist", topic);
        goto out;
    }
    *partition = rd_kafka_msg_partitioner_murmur2_random(rkt, key, strlen(key),
                                                         md->topics[0].partition_cnt, NULL, NULL);

    int64_t low = 0, high = 0;
    ke = rd_kafka_query_watermark_offsets(rk, topic, *partition, &low, &high,
                                          remaining_ms(deadline));
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc =
            cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka watermarks: %s", rd_kafka_err2str(ke));
        goto out;
    }
    /* Start at the first message stamped since then (CreateTime, set when the relay
     * produced it); without an answer, at the beginning of what Kafka still holds. */
    l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, *partition)->offset = scan->since_ms;
    int64_t start = low;
    if (rd_kafka_offsets_for_times(rk, l, remaining_ms(deadline)) == RD_KAFKA_RESP_ERR_NO_ERROR &&
        l->elems[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
        start = l->elems[0].offset < 0 ? high : l->elems[0].offset;
    if (start < low)
        start = low;
    if (start >= high) {
        *complete = true;
        goto out;
    }
    l->elems[0].offset = start;
    ke = rd_kafka_assign(rk, l);
    if (ke != RD_KAFKA_RESP_ERR_NO_ERROR) {
        rc = cqrs_error_set(err, CQRS_ERR_UNAVAILABLE, "Kafka assign: %s", rd_kafka_err2str(ke));
        goto out;
    }
    size_t found = 0, read = 0;
    while (found < n && read < scan->max_messages && cqrs_monotonic_ms() < deadline) {
        rd_kafka_message_t *m =
            rd_kafka_consumer_poll(rk, remaining_ms(deadline) < 100 ? remaining_ms(deadline) : 100);
        if (!m)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            /* With read_committed, the end is the last stable offset. */
            *complete = true;
            rd_kafka_message_destroy(m);
            break;
        }
        if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            read++;
            for (size_t i = 0; i < n; i++)
                if (sought[i].offset < 0 && message_has_id(m, sought[i].event_id)) {
                    sought[i].offset = m->offset;
                    found++;
                }
            if (m->offset + 1 >= high)
                *complete = true;
        }
        rd_kafka_message_destroy(m);
        if (*complete)
            break;
    }
    if (found == n)
        *complete = true;
out:
    if (l)
        rd_kafka_topic_partition_list_destroy(l);
    if (md)
        rd_kafka_metadata_destroy(md);
    if (rkt)
        rd_kafka_topic_destroy(rkt);
    if (rk) {
        rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
    }
    return rc;
}
