/* Unit tests of event.c: the CloudEvents header set and decoding it back, with every
 * required attribute checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/event.h>

static const char *lookup(const char *name, void *ud)
{
    cqrs_event_headers_t *h = ud;
    for (size_t i = 0; i < h->n; i++)
        if (h->name[i] && strcmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

static void make(cqrs_event_t *ev)
{
    char id[37];
    cqrs_uuid_v4(id);
    cqrs_event_init(ev, "product.created.v1", "product", id, 3, json_pack("{s:i}", "x", 1),
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    strcpy(ev->source, "/cqrs-commandd");
    ev->sequence = 77;
}

static void test_headers_are_the_cloudevents_binding(void **state)
{
    (void)state;
    cqrs_event_t ev;
    make(&ev);
    cqrs_event_headers_t h;
    cqrs_event_headers(&ev, &h);
    assert_int_equal(h.n, 11);
    assert_string_equal(lookup("ce_specversion", &h), "1.0");
    assert_string_equal(lookup("ce_id", &h), ev.id);
    assert_string_equal(lookup("ce_type", &h), "product.created.v1");
    assert_string_equal(lookup("ce_source", &h), "/cqrs-commandd");
    assert_string_equal(lookup("ce_subject", &h), ev.aggregate_id);
    assert_string_equal(lookup("ce_time", &h), ev.time);
    assert_string_equal(lookup("content-type", &h), "application/json");
    assert_string_equal(lookup("ce_aggregatetype", &h), "product");
    assert_string_equal(lookup("ce_aggregateversion", &h), "3");
    assert_string_equal(lookup("ce_sequence", &h), "77");
    assert_string_equal(lookup("ce_traceparent", &h), ev.traceparent);
    cqrs_event_close(&ev);
}

static void test_decode_round_trip(void **state)
{
    (void)state;
    cqrs_event_t ev, back;
    make(&ev);
    cqrs_event_headers_t h;
    cqrs_event_headers(&ev, &h);
    cqrs_error_t err;
    assert_int_equal(cqrs_event_decode(lookup, &h, "{\"x\":1}", 7, &back, &err), CQRS_ERR_OK);
    assert_string_equal(back.id, ev.id);
    assert_string_equal(back.aggregate_id, ev.aggregate_id);
    assert_int_equal(back.version, 3);
    assert_int_equal(back.sequence, 77);
    assert_string_equal(back.traceparent, ev.traceparent);
    assert_int_equal(json_integer_value(json_object_get(back.data, "x")), 1);
    cqrs_event_close(&back);
    cqrs_event_close(&ev);
}

static void test_decode_rejects_bad_messages(void **state)
{
    (void)state;
    cqrs_event_t ev, back;
    make(&ev);
    cqrs_event_headers_t h;
    cqrs_error_t err;

    cqrs_event_headers(&ev, &h);
    assert_int_equal(cqrs_event_decode(lookup, &h, "[1]", 3, &back, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&back);
    assert_int_equal(cqrs_event_decode(lookup, &h, "{", 1, &back, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&back);

    h.value[8] = "0"; /* ce_aggregateversion */
    assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_INVALID);
    assert_string_equal(err.where, "ce_aggregateversion");

    cqrs_event_headers(&ev, &h);
    h.value[0] = "0.3";
    assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_INVALID);

    cqrs_event_headers(&ev, &h);
    h.value[4] = "not-a-uuid"; /* ce_subject */
    assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_INVALID);

    cqrs_event_headers(&ev, &h);
    h.name[1] = "x-no-id";
    assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_INVALID);
    assert_string_equal(err.where, "ce_id");
    cqrs_event_close(&ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_headers_are_the_cloudevents_binding),
        cmocka_unit_test(test_decode_round_trip),
        cmocka_unit_test(test_decode_rejects_bad_messages),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
