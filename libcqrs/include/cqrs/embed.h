/* embed.h — files compiled into a binary (see cmake/Embed.cmake). */
#ifndef CQRS_EMBED_H
#define CQRS_EMBED_H

typedef struct cqrs_embedded_file {
    const char *name; /* base name, e.g. "0001_event_store.sql"; NULL ends the array */
    const char *text; /* NUL-terminated content */
} cqrs_embedded_file_t;

#endif
