/* bus.c — Kafka helpers: configuration, topic creation, metadata ping. */
#include "cqrs/bus.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cqrs/log.h"

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
