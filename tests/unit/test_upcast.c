/* Unit tests of versioned event types and upcasters (libcqrs/src/upcast.c), pure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cqrs/upcast.h"

/* thing.made: v1 {n}, v2 {n, unit} (unit "piece"), v3 {count, unit} (n renamed). */
static cqrs_err_t v1_v2(json_t *data, const cqrs_event_t *ev, cqrs_error_t *err)
{
    (void)ev;
    (void)err;
    json_object_set_new(data, "unit", json_string("piece"));
    return CQRS_ERR_OK;
}

static cqrs_err_t v2_v3(json_t *data, const cqrs_event_t *ev, cqrs_error_t *err)
{
    (void)ev;
    json_t *n = json_object_get(data, "n");
    if (!json_is_integer(n))
        return cqrs_error_set(err, CQRS_ERR_INVALID, "thing.made.v2 without n");
    json_object_set(data, "count", n);
    json_object_del(data, "n");
    return CQRS_ERR_OK;
}

static const cqrs_upcast_fn thing_up[] = {v1_v2, v2_v3};
static const cqrs_event_kind_t kinds[] = {{"thing.made", 3, thing_up}, {"thing.gone", 1, NULL}};
static const cqrs_event_registry_t reg = {kinds, 2};

static void event(cqrs_event_t *ev, const char *type, json_t *data)
{
    cqrs_event_init(ev, type, "thing", "6f9619ff-8b86-4011-b42d-00c04fc964ff", 1, data, NULL);
}

static void test_type_parse(void **state)
{
    (void)state;
    char name[32];
    int v = 0;
    assert_true(cqrs_event_type_parse("product.created.v12", name, sizeof name, &v));
    assert_string_equal(name, "product.created");
    assert_int_equal(v, 12);
    static const char *const bad[] = {"product.created",
                                      "product.created.v0",
                                      "product.created.v",
                                      "product.created.v1x",
                                      ".v1",
                                      "v1",
                                      "product.created.V1",
                                      "product.created.v01",
                                      ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (cqrs_event_type_parse(bad[i], name, sizeof name, &v))
            fail_msg("%s taken for a versioned type", bad[i]);
    /* a name that does not fit */
    assert_false(cqrs_event_type_parse("product.created.v1", name, 8, &v));
}

static void test_older_versions_are_brought_up_in_turn(void **state)
{
    (void)state;
    cqrs_event_t ev;
    cqrs_error_t err;
    event(&ev, "thing.made.v1", json_pack("{s:i}", "n", 7));
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    assert_string_equal(ev.type, "thing.made.v3");
    json_t *want = json_pack("{s:i, s:s}", "count", 7, "unit", "piece");
    assert_true(json_equal(ev.data, want));
    json_decref(want);
    /* already the newest: nothing changes */
    json_t *before = json_deep_copy(ev.data);
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    assert_string_equal(ev.type, "thing.made.v3");
    assert_true(json_equal(ev.data, before));
    json_decref(before);
    cqrs_event_close(&ev);
    /* from the middle */
    event(&ev, "thing.made.v2", json_pack("{s:i, s:s}", "n", 1, "unit", "box"));
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    want = json_pack("{s:i, s:s}", "count", 1, "unit", "box");
    assert_true(json_equal(ev.data, want));
    json_decref(want);
    cqrs_event_close(&ev);
    /* a type with one version */
    event(&ev, "thing.gone.v1", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    assert_string_equal(ev.type, "thing.gone.v1");
    cqrs_event_close(&ev);
}

/* What a reader cannot read is refused with a reason naming it, and the event is unchanged. */
static void test_unknown_and_newer_are_refused(void **state)
{
    (void)state;
    cqrs_event_t ev;
    cqrs_error_t err;
    event(&ev, "thing.made.v4", json_pack("{s:i}", "count", 1));
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_INVALID);
    assert_string_equal(err.where, "ce_type");
    assert_non_null(strstr(err.message, "thing.made.v4 is newer than this build knows "
                                        "(thing.made.v3)"));
    assert_non_null(strstr(err.message, "cqrsctl dlq retry"));
    assert_string_equal(ev.type, "thing.made.v4");
    cqrs_event_close(&ev);
    event(&ev, "thing.painted.v1", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_INVALID);
    assert_non_null(strstr(err.message, "thing.painted.v1 is unknown to this build"));
    cqrs_event_close(&ev);
    event(&ev, "thing.made", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_INVALID);
    assert_non_null(strstr(err.message, "not of the form"));
    cqrs_event_close(&ev);
    /* no registry: nothing is known */
    event(&ev, "thing.made.v1", json_object());
    assert_int_equal(cqrs_event_upcast(NULL, &ev, &err), CQRS_ERR_INVALID);
    cqrs_event_close(&ev);
}

/* A failing upcaster (v2 → v3 needs n) leaves the event as it was, v1 → v2 included. */
static void test_failing_upcaster_changes_nothing(void **state)
{
    (void)state;
    cqrs_event_t ev;
    cqrs_error_t err;
    event(&ev, "thing.made.v1", json_pack("{s:s}", "n", "seven"));
    json_t *before = json_deep_copy(ev.data);
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_INVALID);
    assert_string_equal(err.message, "thing.made.v2 without n");
    assert_string_equal(ev.type, "thing.made.v1");
    assert_true(json_equal(ev.data, before));
    json_decref(before);
    cqrs_event_close(&ev);
}

#ifdef CQRS_ENABLE_FAILPOINTS
/* The rolling deployment's old reader, played by this build. */
static void test_pretend_unknown_switch(void **state)
{
    (void)state;
    cqrs_event_t ev;
    cqrs_error_t err;
    setenv("CQRS_TEST_UNKNOWN_EVENT_TYPES", "thing.gone.v1,thing.made.v3", 1);
    event(&ev, "thing.made.v3", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_INVALID);
    assert_non_null(strstr(err.message, "unknown to this build"));
    cqrs_event_close(&ev);
    /* exact types only: v1 is still read (brought up to v3) */
    event(&ev, "thing.made.v1", json_pack("{s:i}", "n", 1));
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    cqrs_event_close(&ev);
    unsetenv("CQRS_TEST_UNKNOWN_EVENT_TYPES");
    event(&ev, "thing.made.v3", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    cqrs_event_close(&ev);
}
#else
/* Inert in a release build: the switch is a test tool, never a way to make a reader refuse. */
static void test_switch_is_inert_without_failpoints(void **state)
{
    (void)state;
    cqrs_event_t ev;
    cqrs_error_t err;
    setenv("CQRS_TEST_UNKNOWN_EVENT_TYPES", "thing.made.v3", 1);
    event(&ev, "thing.made.v3", json_object());
    assert_int_equal(cqrs_event_upcast(&reg, &ev, &err), CQRS_ERR_OK);
    cqrs_event_close(&ev);
    unsetenv("CQRS_TEST_UNKNOWN_EVENT_TYPES");
}
#endif

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_parse),
        cmocka_unit_test(test_older_versions_are_brought_up_in_turn),
        cmocka_unit_test(test_unknown_and_newer_are_refused),
        cmocka_unit_test(test_failing_upcaster_changes_nothing),
#ifdef CQRS_ENABLE_FAILPOINTS
        cmocka_unit_test(test_pretend_unknown_switch),
#else
        cmocka_unit_test(test_switch_is_inert_without_failpoints),
#endif
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
