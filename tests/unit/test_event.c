/* Unit tests of event.c: the CloudEvents header set and decoding it back, with every
 * required attribute checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
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
    assert_int_equal(h.n, 12);
    assert_string_equal(lookup("ce_specversion", &h), "1.0");
    assert_string_equal(lookup("ce_id", &h), ev.id);
    assert_string_equal(lookup("ce_type", &h), "product.created.v1");
    assert_string_equal(lookup("ce_source", &h), "/cqrs-commandd");
    assert_string_equal(lookup("ce_subject", &h), ev.aggregate_id);
    assert_string_equal(lookup("ce_time", &h), ev.time);
    assert_string_equal(lookup("content-type", &h), "application/json");
    assert_string_equal(lookup("ce_aggregatetype", &h), "product");
    assert_string_equal(lookup("ce_aggregateversion", &h), "3");
    assert_string_equal(lookup("ce_sequence", &h), "00000000000000000077");
    assert_string_equal(lookup("ce_traceparent", &h), ev.traceparent);
    assert_string_equal(lookup("ce_dataschema", &h), "urn:cqrs:event:product.created.v1");
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

/* ce_sequence is the CloudEvents Sequence extension: its values must sort as strings in the
 * order of the sequence; and messages written before the padding still decode. */
static void test_sequence_sorts_as_a_string(void **state)
{
    (void)state;
    cqrs_event_t ev, back;
    make(&ev);
    static const int64_t seqs[] = {1, 2, 9, 10, 11, 99, 100, 12345678901234, INT64_MAX};
    char prev[24] = "";
    for (size_t i = 0; i < sizeof seqs / sizeof seqs[0]; i++) {
        ev.sequence = seqs[i];
        cqrs_event_headers_t h;
        cqrs_event_headers(&ev, &h);
        const char *s = lookup("ce_sequence", &h);
        assert_int_equal(strlen(s), CQRS_EVENT_SEQUENCE_DIGITS);
        if (prev[0] && strcmp(prev, s) >= 0)
            fail_msg("'%s' does not sort before '%s'", prev, s);
        strcpy(prev, s);
        cqrs_error_t err;
        assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_OK);
        assert_true(back.sequence == seqs[i]);
        cqrs_event_close(&back);
    }
    /* an unpadded value (an older message) and a padded one read the same */
    const char *forms[] = {"77", "00000000000000000077", "077"};
    for (size_t i = 0; i < 3; i++) {
        cqrs_event_headers_t h;
        cqrs_event_headers(&ev, &h);
        h.value[9] = forms[i]; /* ce_sequence */
        assert_string_equal(h.name[9], "ce_sequence");
        cqrs_error_t err;
        assert_int_equal(cqrs_event_decode(lookup, &h, "{}", 2, &back, &err), CQRS_ERR_OK);
        assert_int_equal(back.sequence, 77);
        cqrs_event_close(&back);
    }
    cqrs_event_close(&ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_headers_are_the_cloudevents_binding),
        cmocka_unit_test(test_decode_round_trip),
        cmocka_unit_test(test_decode_rejects_bad_messages),
        cmocka_unit_test(test_sequence_sorts_as_a_string),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
