/* failpoint.c — see failpoint.h. Compiled only with CQRS_ENABLE_FAILPOINTS. */
#include "cqrs/failpoint.h"

#ifdef CQRS_ENABLE_FAILPOINTS
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cqrs/log.h"

static atomic_int fired[16]; /* per entry of CQRS_FAILPOINTS, for "*N" */

bool cqrs__failpoint(const char *name)
{
    const char *spec = getenv("CQRS_FAILPOINTS");
    if (!spec || !*spec)
        return false;
    size_t nlen = strlen(name);
    int index = 0;
    for (const char *p = spec; p && *p; index++) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len > nlen && strncmp(p, name, nlen) == 0 && p[nlen] == '=') {
            char action[64];
            snprintf(action, sizeof action, "%.*s", (int)(len - nlen - 1), p + nlen + 1);
            char *star = strchr(action, '*');
            if (star) {
                *star = '\0';
                int times = atoi(star + 1);
                if (index < 16 && atomic_fetch_add(&fired[index], 1) >= (times > 0 ? times : 1))
                    return false;
            }
            CQRS_LOG_WARN("failpoint fired", "failpoint", name, "action", action);
            if (strcmp(action, "kill") == 0)
                raise(SIGKILL);
            if (strcmp(action, "stop") == 0 || strcmp(action, "pause") == 0) {
                raise(SIGSTOP);
                return false;
            }
            if (strncmp(action, "delay:", 6) == 0) {
                usleep((useconds_t)atoi(action + 6) * 1000u);
                return false;
            }
            return strcmp(action, "error") == 0;
        }
        p = end ? end + 1 : NULL;
    }
    return false;
}

bool cqrs__unsafe(const char *name)
{
    char var[96];
    snprintf(var, sizeof var, "CQRS_UNSAFE_%s", name);
    const char *v = getenv(var);
    return v && strcmp(v, "1") == 0;
}
#endif
