/* topics.h — the domain's Kafka topics, named in this one place: "<prefix>.<aggregate type>.events"
 * (<prefix> is CQRS_TOPIC_PREFIX), one topic per aggregate type, products and orders. */
#ifndef CQRS_SERVICES_TOPICS_H
#define CQRS_SERVICES_TOPICS_H

#include <cqrs/config.h>
#include <stdio.h>

/* The CQRS_TOPIC_PREFIX row of a settings table; dest: char ** (cqrs_config_load). */
#define TOPIC_PREFIX_SETTING(dest)                                                                 \
    {                                                                                              \
        "CQRS_TOPIC_PREFIX", CQRS_CONFIG_STRING, "cqrs", 0, 0,                                     \
            "topics are <prefix>.product.events and <prefix>.order.events", (dest), NULL           \
    }

/* The aggregate types, each with its topic: topic_type(0 .. TOPIC_TYPES-1). */
enum { TOPIC_PRODUCT, TOPIC_ORDER, TOPIC_TYPES };
static inline const char *topic_type(int i)
{
    static const char *const types[TOPIC_TYPES] = {"product", "order"};
    return types[i];
}

/* The topic of an aggregate type into out[cap] (any type: tools name what they find). */
static inline void topic_name(const char *prefix, const char *aggregate_type, char *out, size_t cap)
{
    snprintf(out, cap, "%s.%s.events", prefix, aggregate_type);
}

/* Every topic of the domain, in topic_type order; names[] points into name[]. */
typedef struct topics {
    char name[TOPIC_TYPES][256];
    const char *names[TOPIC_TYPES];
} topics_t;

static inline void topics_init(topics_t *t, const char *prefix)
{
    for (int i = 0; i < TOPIC_TYPES; i++) {
        topic_name(prefix, topic_type(i), t->name[i], sizeof t->name[i]);
        t->names[i] = t->name[i];
    }
}

#endif
