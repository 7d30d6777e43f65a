/*
 * NovaCron guest memory workload, for live-migration checks.
 *
 * Keeps a region of memory whose every 4 KiB page holds pseudo-random words derived from (page
 * number, page generation, word). Every tick it rewrites some pages (a new generation: they are dirty for
 * migration), re-verifies a rolling window of pages against their expected pattern, and prints
 *
 *   NOVACRON-WORKLOAD tick=<n> pages=<n> dirtied=<total> verified=<total> errors=<total> state=<hex>
 *
 * on stdout (the serial console). `tick` only grows while this process lives, so a migrated guest
 * shows continuity; `errors` counts pages whose content differs from what was written (memory
 * lost or corrupted in transit); `state` is a hash of all page generations, identical on both
 * sides of a migration at the same tick.
 *
 * Options: --mib N (region size, default 64), --dirty-pages N (pages rewritten per tick, default
 * 1024), --verify-pages N (pages verified per tick, default 2048), --interval-ms N (default 1000),
 * --kind random|records (default random). `random` pages are incompressible and so is every
 * rewrite (the adversarial case); `records` pages hold text records like an application's log or
 * request buffers (a timestamp, ids, a status, a path: about 4x with zstd -3), each generation
 * with fresh values, so a rewrite is compressible but no small delta of the page before.
 * Built static by scripts/build-guest; started by the guest's rcS when the kernel command line
 * has novacron.workload=1 (novacron.workload_mib=N sets the size).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGE_WORDS (4096 / sizeof(uint64_t))

static uint64_t mix(uint64_t value)
{
    value += 0x9e3779b97f4a7c15ULL;
    value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ULL;
    value = (value ^ (value >> 27)) * 0x94d049bb133111ebULL;
    return value ^ (value >> 31);
}

static uint64_t pattern_seed(uint64_t page, uint32_t generation)
{
    return mix((page << 32) ^ generation);
}

/* Every word of every generation is a fresh pseudo-random value: a page is incompressible, and so
 * is its difference from the page's previous generation (a delta codec gains nothing). */
static void fill_page(uint64_t *words, uint64_t page, uint32_t generation)
{
    uint64_t seed = pattern_seed(page, generation);
    for (size_t word = 0; word < PAGE_WORDS; word++)
        words[word] = mix(seed + word);
}

static const char *const METHODS[] = {"GET", "GET", "GET", "POST", "PUT", "DELETE"};
static const char *const RESOURCES[] = {"orders", "customers", "items", "invoices", "sessions",
                                        "carts", "reports", "users"};
static const int STATUSES[] = {200, 200, 200, 200, 201, 204, 304, 404, 500};

/* Text records of a request log: fields drawn from small vocabularies and bounded numbers, as
 * real application memory holds, so zstd finds structure; every generation draws new values. */
static void fill_records(char *bytes, uint64_t page, uint32_t generation)
{
    uint64_t seed = pattern_seed(page, generation);
    size_t used = 0;
    for (uint64_t line = 0; used < 4096; line++) {
        uint64_t r = mix(seed + line);
        char record[160];
        int length = snprintf(
            record, sizeof record,
            "2026-12-03T%02u:%02u:%02u.%03uZ req=%08" PRIx64 " %s /api/v1/%s/%u status=%d "
            "bytes=%u ms=%u user=u%04u\n",
            (unsigned)(r % 24), (unsigned)((r >> 5) % 60), (unsigned)((r >> 11) % 60),
            (unsigned)((r >> 17) % 1000), (page << 20 | line) ^ generation,
            METHODS[(r >> 27) % 6], RESOURCES[(r >> 30) % 8], (unsigned)((r >> 33) % 100000),
            STATUSES[(r >> 50) % 9], (unsigned)((r >> 20) % 65536), (unsigned)((r >> 40) % 900),
            (unsigned)((r >> 44) % 5000));
        size_t take = (size_t)length < 4096 - used ? (size_t)length : 4096 - used;
        memcpy(bytes + used, record, take);
        used += take;
    }
}

static int records_kind = 0;

static void fill(uint64_t *words, uint64_t page, uint32_t generation)
{
    if (records_kind)
        fill_records((char *)words, page, generation);
    else
        fill_page(words, page, generation);
}

static int page_is_intact(const uint64_t *words, uint64_t page, uint32_t generation)
{
    uint64_t expected[PAGE_WORDS];
    fill(expected, page, generation);
    return memcmp(words, expected, sizeof expected) == 0;
}

static const char *text_option(int argc, char **argv, const char *name, const char *fallback)
{
    for (int index = 1; index + 1 < argc; index++)
        if (strcmp(argv[index], name) == 0)
            return argv[index + 1];
    return fallback;
}

static unsigned long option(int argc, char **argv, const char *name, unsigned long fallback)
{
    for (int index = 1; index + 1 < argc; index++)
        if (strcmp(argv[index], name) == 0)
            return strtoul(argv[index + 1], NULL, 10);
    return fallback;
}

int main(int argc, char **argv)
{
    unsigned long mib = option(argc, argv, "--mib", 64);
    unsigned long dirty_per_tick = option(argc, argv, "--dirty-pages", 1024);
    unsigned long verify_per_tick = option(argc, argv, "--verify-pages", 2048);
    unsigned long interval_ms = option(argc, argv, "--interval-ms", 1000);
    const char *kind = text_option(argc, argv, "--kind", "random");
    if (strcmp(kind, "records") == 0) {
        records_kind = 1;
    } else if (strcmp(kind, "random") != 0) {
        fprintf(stderr, "novacron-workload: --kind must be random or records, not %s\n", kind);
        return 2;
    }
    uint64_t pages = (uint64_t)mib * 256;
    if (pages == 0) {
        fprintf(stderr, "novacron-workload: --mib must be at least 1\n");
        return 2;
    }
    uint64_t *region = malloc(pages * 4096);
    uint32_t *generations = calloc(pages, sizeof(uint32_t));
    if (region == NULL || generations == NULL) {
        fprintf(stderr, "novacron-workload: cannot allocate %lu MiB\n", mib);
        return 1;
    }
    for (uint64_t page = 0; page < pages; page++)
        fill(region + page * PAGE_WORDS, page, 0);

    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t tick = 0, dirtied = 0, verified = 0, errors = 0;
    uint64_t random_state = 0x243f6a8885a308d3ULL, verify_cursor = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        for (unsigned long count = 0; count < dirty_per_tick; count++) {
            random_state = mix(random_state);
            uint64_t page = random_state % pages;
            generations[page]++;
            fill(region + page * PAGE_WORDS, page, generations[page]);
            dirtied++;
        }
        for (unsigned long count = 0; count < verify_per_tick; count++) {
            uint64_t page = verify_cursor;
            verify_cursor = (verify_cursor + 1) % pages;
            if (!page_is_intact(region + page * PAGE_WORDS, page, generations[page])) {
                errors++;
                printf("NOVACRON-WORKLOAD-CORRUPT page=%" PRIu64 " generation=%u\n", page, generations[page]);
                fill(region + page * PAGE_WORDS, page, generations[page]);
            }
            verified++;
        }
        uint64_t state = 0xcbf29ce484222325ULL;
        for (uint64_t page = 0; page < pages; page++)
            state = (state ^ generations[page]) * 0x100000001b3ULL;
        tick++;
        printf("NOVACRON-WORKLOAD tick=%" PRIu64 " pages=%" PRIu64 " dirtied=%" PRIu64 " verified=%" PRIu64
               " errors=%" PRIu64 " state=%016" PRIx64 "\n",
               tick, pages, dirtied, verified, errors, state);

        next.tv_nsec += (long)(interval_ms % 1000) * 1000000L;
        next.tv_sec += (time_t)(interval_ms / 1000) + next.tv_nsec / 1000000000L;
        next.tv_nsec %= 1000000000L;
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
    }
}
