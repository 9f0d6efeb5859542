/* test_keyspace.c — key names of the read model and the partition of an aggregate (keyspace.h).
 *
 * The shard of an aggregate must be the partition the relay's producer picks for its key, or
 * a reader looks for a document in another shard than the projector wrote it to: checked
 * against librdkafka's own murmur2 partitioner on many keys and partition counts.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>
#include <librdkafka/rdkafka.h>

#include <cqrs/keyspace.h>
#include <cqrs/util.h>

static void test_partition_is_the_producers(void **state)
{
    (void)state;
    static const int32_t counts[] = {1, 2, 3, 6, 7, 12, 16, 64, 1000};
    for (int i = 0; i < 2000; i++) {
        char id[CQRS_UUID_LEN + 1];
        cqrs_uuid_v4(id);
        if (i % 7 == 0) /* other lengths too: every tail length of the hash */
            id[i % 36] = '\0';
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            int32_t want =
                rd_kafka_msg_partitioner_murmur2(NULL, id, strlen(id), counts[c], NULL, NULL);
            if (cqrs_keys_partition(id, counts[c]) != want)
                fail_msg("key '%s' among %d: %d, librdkafka %d", id, counts[c],
                         cqrs_keys_partition(id, counts[c]), want);
        }
    }
    /* Kafka's reference value (Java Utils.murmur2("21") = -973932308) */
    assert_int_equal((int32_t)cqrs_murmur2("21", 2), -973932308);
}

static void test_every_shard_key_carries_its_hash_tag(void **state)
{
    (void)state;
    char shard[CQRS_SHARD_MAX], key[CQRS_KEY_MAX];
    cqrs_keys_shard("cqrs", "cqrs.product.events", 3, shard, sizeof shard);
    assert_string_equal(shard, "{cqrs:cqrs.product.events:3}:g1:");
    cqrs_keys_in(shard, CQRS_SHARD_META, key, sizeof key);
    assert_string_equal(key, "{cqrs:cqrs.product.events:3}:g1:meta");
    cqrs_keys_doc(shard, "80dd89dc-825b-49fd-bcf9-5526540bbf6f", key, sizeof key);
    assert_string_equal(key,
                        "{cqrs:cqrs.product.events:3}:g1:doc:80dd89dc-825b-49fd-bcf9-5526540bbf6f");
    assert_string_equal(cqrs_keys_id(key), "80dd89dc-825b-49fd-bcf9-5526540bbf6f");
    cqrs_keys_dlq(shard, "x", key, sizeof key);
    assert_string_equal(key, "{cqrs:cqrs.product.events:3}:g1:dlq:x");
    cqrs_keys_unknown(shard, "x", key, sizeof key);
    assert_string_equal(key, "{cqrs:cqrs.product.events:3}:g1:unknown:x");
    cqrs_keys_global("shop", "layout", key, sizeof key);
    assert_string_equal(key, "shop:layout");
    /* the longest prefix and topic fit */
    char topic[250];
    memset(topic, 't', 249);
    topic[249] = '\0';
    cqrs_keys_shard("12345678901234567890123456789012", topic, 1023, shard, sizeof shard);
    cqrs_keys_in(shard, CQRS_SHARD_UNDECODABLE, key, sizeof key);
    assert_int_equal(strlen(shard), 1 + 32 + 1 + 249 + 1 + 4 + 2 + 3);
    assert_non_null(strstr(key, "}:g1:dlq:undecodable"));
}

static void test_generations(void **state)
{
    (void)state;
    char shard[CQRS_SHARD_MAX], ptr[CQRS_KEY_MAX];
    int64_t gen = 0;
    cqrs_keys_shard_gen("cqrs", "t.product.events", 5, 12, shard, sizeof shard);
    assert_string_equal(shard, "{cqrs:t.product.events:5}:g12:");
    assert_true(cqrs_keys_shard_parse(shard, ptr, sizeof ptr, &gen));
    assert_string_equal(ptr, "{cqrs:t.product.events:5}:gen");
    assert_int_equal(gen, 12);
    assert_false(cqrs_keys_shard_parse("{cqrs:t:5}:", ptr, sizeof ptr, &gen));
    assert_false(cqrs_keys_shard_parse("cqrs:t:5}:g1:", ptr, sizeof ptr, &gen));
    assert_false(cqrs_keys_shard_parse("{cqrs:t:5}:g0:", ptr, sizeof ptr, &gen));
    assert_false(cqrs_keys_shard_parse("{cqrs:t:5}:g1:doc:x", ptr, sizeof ptr, &gen));
    /* the name a document is announced and waited on by is the same in every generation */
    char name[CQRS_KEY_MAX];
    cqrs_keys_name("{cqrs:t:5}:g12:doc:x", name, sizeof name);
    assert_string_equal(name, "{cqrs:t:5}:doc:x");
    cqrs_keys_name("{cqrs:t:5}:g1:doc:x", name, sizeof name);
    assert_string_equal(name, "{cqrs:t:5}:doc:x");
    cqrs_keys_name("cqrs:layout", name, sizeof name);
    assert_string_equal(name, "cqrs:layout");
    cqrs_keys_name("{cqrs:t:5}:gen", name, sizeof name);
    assert_string_equal(name, "{cqrs:t:5}:gen");
}

static void test_prefixes(void **state)
{
    (void)state;
    assert_true(cqrs_keys_prefix_valid("cqrs"));
    assert_true(cqrs_keys_prefix_valid("A-z_0.9"));
    assert_false(cqrs_keys_prefix_valid(""));
    assert_false(cqrs_keys_prefix_valid(NULL));
    assert_false(cqrs_keys_prefix_valid("a:b"));
    assert_false(cqrs_keys_prefix_valid("a{b}"));
    assert_false(cqrs_keys_prefix_valid("123456789012345678901234567890123"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_partition_is_the_producers),
        cmocka_unit_test(test_every_shard_key_carries_its_hash_tag),
        cmocka_unit_test(test_generations),
        cmocka_unit_test(test_prefixes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
