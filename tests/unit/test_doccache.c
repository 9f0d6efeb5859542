/* Unit tests of the versioned document cache and of change-announcement parsing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cqrs/changefeed.h>
#include <cqrs/doccache.h>

static void put(cqrs_doccache_t *c, const char *key, int64_t v, const char *json)
{
    cqrs_doccache_put(c, key, cqrs_doccache_ticket(c, key), v, json, strlen(json));
}

static int64_t get(cqrs_doccache_t *c, const char *key, int64_t min)
{
    char *json = NULL;
    int64_t v = -1;
    if (!cqrs_doccache_get(c, key, min, &json, &v))
        return -1;
    free(json);
    return v;
}

static void test_disabled_until_reset(void **state)
{
    (void)state;
    cqrs_doccache_t *c = cqrs_doccache_new(1 << 20);
    put(c, "k", 1, "{}");
    assert_int_equal(get(c, "k", 0), -1); /* starts off: the feed is not subscribed yet */
    cqrs_doccache_reset(c, true);
    put(c, "k", 1, "{\"a\":1}");
    char *json = NULL;
    int64_t v = 0;
    assert_true(cqrs_doccache_get(c, "k", 0, &json, &v));
    assert_string_equal(json, "{\"a\":1}");
    assert_int_equal(v, 1);
    free(json);
    cqrs_doccache_reset(c, false); /* feed lost: nothing is served or filled */
    assert_int_equal(get(c, "k", 0), -1);
    put(c, "k", 1, "{}");
    assert_int_equal(get(c, "k", 0), -1);
    cqrs_doccache_destroy(c);
}

static void test_versions_and_announcements(void **state)
{
    (void)state;
    cqrs_doccache_t *c = cqrs_doccache_new(1 << 20);
    cqrs_doccache_reset(c, true);
    put(c, "k", 3, "{\"v\":3}");
    assert_int_equal(get(c, "k", 0), 3);
    assert_int_equal(get(c, "k", 3), 3);
    assert_int_equal(get(c, "k", 4), -1); /* min_version never answered by an older entry */
    put(c, "k", 2, "{\"v\":2}");          /* a fill never lowers the version */
    assert_int_equal(get(c, "k", 0), 3);
    cqrs_doccache_announce(c, "k", 3); /* not newer: kept */
    assert_int_equal(get(c, "k", 0), 3);
    cqrs_doccache_announce(c, "k", 4); /* newer: dropped */
    assert_int_equal(get(c, "k", 0), -1);
    put(c, "k", 4, "{\"v\":4}");
    assert_int_equal(get(c, "k", 0), 4);
    cqrs_doccache_destroy(c);
}

static void test_fill_racing_an_announcement_is_refused(void **state)
{
    (void)state;
    cqrs_doccache_t *c = cqrs_doccache_new(1 << 20);
    cqrs_doccache_reset(c, true);
    /* A reader takes its ticket, reads version 5 from the store; meanwhile 6 is applied and
     * announced; the late fill of 5 must not land. */
    cqrs_doccache_ticket_t t = cqrs_doccache_ticket(c, "k");
    cqrs_doccache_announce(c, "k", 6);
    cqrs_doccache_put(c, "k", t, 5, "{}", 2);
    assert_int_equal(get(c, "k", 0), -1);
    /* The same after a reset (resubscription). */
    t = cqrs_doccache_ticket(c, "k");
    cqrs_doccache_reset(c, true);
    cqrs_doccache_put(c, "k", t, 5, "{}", 2);
    assert_int_equal(get(c, "k", 0), -1);
    cqrs_doccache_stats_t st;
    cqrs_doccache_stats(c, &st);
    assert_int_equal(st.refused, 2);
    cqrs_doccache_destroy(c);
}

static void test_memory_bound(void **state)
{
    (void)state;
    size_t max = 256 * 1024;
    cqrs_doccache_t *c = cqrs_doccache_new(max);
    cqrs_doccache_reset(c, true);
    char doc[600];
    memset(doc, 'x', sizeof doc - 1);
    doc[sizeof doc - 1] = '\0';
    for (int i = 0; i < 5000; i++) {
        char key[32];
        snprintf(key, sizeof key, "cqrs:product:{%d}", i);
        put(c, key, 1, doc);
    }
    cqrs_doccache_stats_t st;
    cqrs_doccache_stats(c, &st);
    assert_true(st.bytes <= max);
    assert_true(st.entries > 100);
    assert_true(st.evictions > 0);
    assert_int_equal(get(c, "cqrs:product:{4999}", 0), 1); /* the newest stay */
    cqrs_doccache_destroy(c);
}

static void test_parse(void **state)
{
    (void)state;
    char key[128];
    int64_t v = 0;
    bool reset = true;
    const char *m = "cqrs:product:{0b7c} 12";
    assert_true(cqrs_changefeed_parse(m, strlen(m), key, sizeof key, &v, &reset));
    assert_string_equal(key, "cqrs:product:{0b7c}");
    assert_int_equal(v, 12);
    assert_false(reset);
    assert_true(cqrs_changefeed_parse("*", 1, key, sizeof key, &v, &reset));
    assert_true(reset);
    const char *bad[] = {"",    "nospace", "k ",    " 3",
                         "k 0", "k -1",    "k 12x", "k 99999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_false(cqrs_changefeed_parse(bad[i], strlen(bad[i]), key, sizeof key, &v, &reset));
    char small[4];
    assert_false(cqrs_changefeed_parse(m, strlen(m), small, sizeof small, &v, &reset));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_disabled_until_reset),
        cmocka_unit_test(test_versions_and_announcements),
        cmocka_unit_test(test_fill_racing_an_announcement_is_refused),
        cmocka_unit_test(test_memory_bound),
        cmocka_unit_test(test_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
