/* The schedule of one tree decode step, on the host: KV-guided groups, cost-balanced chunks, the work
 * items' order and the merge lists, written into the plan's packed int32 metadata layout.
 *
 * The algorithm and its cost model are documented in plan.py; the specification is the numpy
 * implementation in tests/test_plan_reference.py, which this must equal bit for bit (the tests check
 * it on random forests). It is C because at decode sizes (hundreds of nodes) the same steps as numpy
 * calls cost ~0.5-2 us each whatever they compute: about a hundred of them took 130-240 us of a plan
 * on the H200 hosts, this takes a few. Every pass is linear (counting and radix sorts) and stable, but
 * the one-wave fit, which sorts the groups' remainders with qsort (ties broken by tile: deterministic).
 *
 * Built at first use by schedule.py with the system C compiler (as Triton builds its launchers);
 * plain C99, no Python or numpy headers: called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    DEFT_OK = 0,
    DEFT_BAD_INDPTR = -1,      /* node_indptr does not start at 0, or decreases */
    DEFT_BAD_PARENT = -2,      /* node_parent[i] is not -1 or a node index below i */
    DEFT_BAD_QUERY_NODE = -3,  /* query_node[b] is not a node index */
    DEFT_TOO_MANY_TILES = -4,  /* more query tiles than cap_items (info[4] says how many) */
    DEFT_BAD_CAPACITY = -5,    /* more queries than cap_queries */
    DEFT_NO_MEMORY = -6,
    DEFT_BAD_PARAMETER = -7,   /* a count or size the planner divides by, or sizes by, is below 1 (or
                                  FLOP_PER_BYTE is not positive and finite) */
};

enum { ITEM_FIELDS = 5 }; /* kv_start, kv_len, q_start, q_count, slot */

/* info[] on return: */
enum {
    INFO_PACKED_LEN, /* int32 elements of the packed layout; nothing is written when above out_len */
    INFO_ITEMS,
    INFO_LARGE_ITEMS,
    INFO_PARTIALS, /* = merge entries: every partial is merged exactly once */
    INFO_TILES,
    INFO_O_ITEMS, /* field offsets in the packed layout (qperm is at 0) */
    INFO_O_COUNTS,
    INFO_O_INDPTR,
    INFO_O_SLOTS,
    INFO_LEN
};

/* numpy's pairwise summation of float64 (``ndarray.sum``), so that the chunk-size target, and with
 * it every chunk count, is the very number the specification computes. */
static double pairwise_sum(const double *a, int64_t n) {
    if (n < 8) {
        double res = 0.;
        for (int64_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* Exported for the tests, which hold it to numpy's ``sum``. */
double deft_pairwise_sum(const double *a, int64_t n) { return pairwise_sum(a, n); }

/* Offsets in int32 elements rounded up to 16 bytes: Triton specialises a kernel on each pointer
 * argument's 16-byte alignment, and the plan's fields are views into one buffer at these offsets, so
 * a field's alignment must not change with the batch size (or a captured kernel would meet another). */
static int64_t aligned(int64_t offset) { return (offset + 3) / 4 * 4; }

/* A tile's chunk count: ``n`` rounded as the caller chose, at least 1, at most one per
 * ``min_chunk_tokens`` of its ``len`` tokens. */
static int64_t clamp_chunks(double n, int64_t len, int64_t min_chunk_tokens) {
    const int64_t most = len / min_chunk_tokens > 1 ? len / min_chunk_tokens : 1;
    if (!(n >= 1.0)) return 1;
    return n < (double)most ? (int64_t)n : most;
}

typedef struct {
    double frac;
    int64_t tile, tiles; /* the group's first tile and its number of tiles */
} Remainder;

static int by_remainder(const void *a, const void *b) {
    const Remainder *x = a, *y = b;
    if (x->frac != y->frac) return x->frac > y->frac ? -1 : 1;
    return x->tile < y->tile ? -1 : x->tile > y->tile;
}

/* One wave of programs: when rounding every tile's chunk count up (``t_chunks``, ``n_items`` in all)
 * passes ``target_items`` but rounding down fits, the groups with the largest remainders (ties: the
 * lower tile) get one chunk more while their tiles fit in the spare items. A group's tiles keep one
 * chunk count (the items are laid out chunk by chunk). A few items past the wave run as a second
 * wave of whole programs: on the H200, 4 requests of 8k tokens planned into 68 items per KV head where
 * 66 fit took 60.3 us a step, and 50.3 in 66 (benchmarks/results/ab_one_wave_h200.json). Returns the
 * items; -1 when out of memory. */
static int64_t fit_one_wave(const double *tile_cost, const int64_t *tile_len, const int64_t *tile_node,
                            int64_t n_tiles, double target, int64_t target_items, int64_t min_chunk_tokens,
                            int64_t *t_chunks, int64_t n_items) {
    if (n_items <= target_items) return n_items;
    int64_t floors = 0;
    for (int64_t t = 0; t < n_tiles; t++) floors += clamp_chunks(floor(tile_cost[t] / target), tile_len[t], min_chunk_tokens);
    if (floors > target_items) return n_items;
    Remainder *rem = malloc(sizeof(Remainder) * (n_tiles + 1));
    if (!rem) return -1;
    int64_t n_rem = 0;
    for (int64_t t = 0, g_end; t < n_tiles; t = g_end) {
        for (g_end = t + 1; g_end < n_tiles && tile_node[g_end] == tile_node[t];) g_end++;
        const double x = tile_cost[t] / target;
        const int64_t down = clamp_chunks(floor(x), tile_len[t], min_chunk_tokens);
        if (down < t_chunks[t]) rem[n_rem++] = (Remainder){x - floor(x), t, g_end - t};
        for (int64_t u = t; u < g_end; u++) t_chunks[u] = down;
    }
    qsort(rem, n_rem, sizeof(Remainder), by_remainder);
    int64_t spare = target_items - floors;
    for (int64_t k = 0; k < n_rem; k++) {
        if (rem[k].tiles > spare) continue;
        for (int64_t u = rem[k].tile; u < rem[k].tile + rem[k].tiles; u++) t_chunks[u]++;
        spare -= rem[k].tiles;
    }
    free(rem);
    return target_items - spare;
}

/* Plans one step into ``out`` (int32, ``out_len`` elements): qperm at 0, then the items, the counts,
 * merge_indptr and merge_slots at the offsets info[] reports, laid out for ``cap_queries`` queries and
 * ``cap_items`` items (-1: this step's own numbers). ``cap_items`` also bounds the items: chunks are
 * coarsened until they fit. Returns a DEFT_* status; fills info[] (INFO_*) as far as it got. Writes
 * ``out`` only when the layout fits in ``out_len``; else info[INFO_PACKED_LEN] says what it needs. */
int64_t deft_schedule(const int32_t *node_indptr, const int32_t *node_parent, int64_t num_nodes,
                      const int32_t *query_node, int64_t num_queries, int64_t group_size, int64_t head_dim,
                      int64_t kv_elem_bytes, int64_t num_kv_heads, int64_t num_sms, int64_t large_rows,
                      int64_t programs_per_sm, int64_t small_rows, int64_t min_chunk_tokens,
                      double flop_per_byte, int64_t program_latency_bytes, int64_t cap_queries, int64_t cap_items,
                      int32_t *out, int64_t out_len, int64_t *info) {
    const int64_t N = num_nodes, B = num_queries;
    for (int k = 0; k < INFO_LEN; k++) info[k] = 0;
    /* The planner's constants are module attributes that experiments change: a zero would divide by zero. */
    if (min_chunk_tokens < 1 || group_size < 1 || head_dim < 1 || kv_elem_bytes < 1 || num_kv_heads < 1 ||
        num_sms < 1 || large_rows < 1 || programs_per_sm < 1 || small_rows < 0 ||
        !(flop_per_byte > 0 && flop_per_byte < 1e300) || program_latency_bytes < 0)  /* (NaN fails too) */
        return DEFT_BAD_PARAMETER;
    if (node_indptr[0] != 0) return DEFT_BAD_INDPTR;
    for (int64_t i = 0; i < N; i++) {
        if (node_indptr[i + 1] < node_indptr[i]) return DEFT_BAD_INDPTR;
        if (node_parent[i] < -1 || node_parent[i] >= i) return DEFT_BAD_PARENT;
    }
    for (int64_t b = 0; b < B; b++)
        if (query_node[b] < 0 || query_node[b] >= N) return DEFT_BAD_QUERY_NODE;
    if (cap_queries < 0) cap_queries = B;
    if (cap_queries < B) return DEFT_BAD_CAPACITY;
    const int64_t T = node_indptr[N];

    int64_t status = DEFT_OK;
    /* Per node: queries ending there, queries in its subtree, first position of its users in qperm. */
    int64_t *node_mem = malloc(sizeof(int64_t) * (3 * N + 1));
    int32_t *qperm = malloc(sizeof(int32_t) * (B + 1));
    int64_t *tile_mem = NULL, *item_mem = NULL, *part_mem = NULL;
    double *tile_cost = NULL;
    if (!node_mem || !qperm) {
        status = DEFT_NO_MEMORY;
        goto done;
    }
    int64_t *ends = node_mem, *users = node_mem + N, *lo = node_mem + 2 * N;
    memset(ends, 0, sizeof(int64_t) * N);
    for (int64_t b = 0; b < B; b++) ends[query_node[b]]++;
    memcpy(users, ends, sizeof(int64_t) * N);
    for (int64_t i = N - 1; i >= 0; i--)
        if (node_parent[i] >= 0) users[node_parent[i]] += users[i];
    /* Queries in tree preorder (children in index order): a node's users are the range
     * [lo, lo + users) of qperm, its own queries first. ``ends`` becomes each node's next free position:
     * parents come before children (parent[i] < i), so one pass in index order places everything. */
    int64_t next_root = 0;
    for (int64_t i = 0; i < N; i++) {
        int32_t p = node_parent[i];
        if (p < 0) {
            lo[i] = next_root;
            next_root += users[i];
        } else {
            lo[i] = ends[p];
            ends[p] += users[i];
        }
        ends[i] += lo[i];
    }
    /* Own queries: stably by query index, at the start of the node's range. */
    for (int64_t i = 0; i < N; i++) ends[i] = lo[i];
    for (int64_t b = 0; b < B; b++) qperm[ends[query_node[b]]++] = (int32_t)b;

    /* Groups (non-empty nodes with users, ascending) and their query tiles. */
    const int64_t small_q = small_rows / group_size;
    const int64_t large_q = large_rows / group_size > 1 ? large_rows / group_size : 1;
    int64_t n_tiles = 0;
    for (int64_t i = 0; i < N; i++) {
        if (users[i] == 0 || node_indptr[i + 1] == node_indptr[i]) continue;
        n_tiles += users[i] <= small_q ? 1 : (users[i] + large_q - 1) / large_q;
    }
    info[INFO_TILES] = n_tiles;
    if (cap_items >= 0 && n_tiles > cap_items) {
        status = DEFT_TOO_MANY_TILES;
        goto done;
    }
    /* Per tile: node, query start, query count, small?, chunks, KV length. */
    tile_mem = malloc(sizeof(int64_t) * (6 * n_tiles + 1));
    tile_cost = malloc(sizeof(double) * (n_tiles + 1));
    if (!tile_mem || !tile_cost) {
        status = DEFT_NO_MEMORY;
        goto done;
    }
    int64_t *t_node = tile_mem, *t_qs = tile_mem + n_tiles, *t_qc = tile_mem + 2 * n_tiles;
    int64_t *t_small = tile_mem + 3 * n_tiles, *t_chunks = tile_mem + 4 * n_tiles, *t_len = tile_mem + 5 * n_tiles;
    int64_t fixed = 0, t = 0;
    for (int64_t i = 0; i < N; i++) {
        const int64_t len = node_indptr[i + 1] - node_indptr[i];
        if (users[i] == 0 || len == 0) continue;
        const int small = users[i] <= small_q;
        const int64_t tiles = small ? 1 : (users[i] + large_q - 1) / large_q;
        const int64_t rows = small ? small_rows : large_rows;
        /* The cost model (plan.py): tokens * (KV bytes + math) + fixed(rows), per tile. */
        const double cost =
            (double)len * ((double)(2 * head_dim * kv_elem_bytes) + (double)(rows * 4 * head_dim) / flop_per_byte);
        for (int64_t k = 0; k < tiles; k++, t++) {
            t_node[t] = i;
            t_qs[t] = lo[i] + k * large_q;
            t_qc[t] = small ? users[i] : (users[i] - k * large_q < large_q ? users[i] - k * large_q : large_q);
            t_small[t] = small;
            tile_cost[t] = cost;
            fixed += program_latency_bytes + rows * head_dim * kv_elem_bytes + 2 * t_qc[t] * group_size * head_dim * 4;
        }
    }
    const int64_t heads = num_kv_heads > 1 ? num_kv_heads : 1;
    const int64_t target_items = programs_per_sm * num_sms / heads > 1 ? programs_per_sm * num_sms / heads : 1;
    double target = (pairwise_sum(tile_cost, n_tiles) + (double)fixed) / (double)target_items;
    if (!(target >= 1.0)) target = 1.0;
    int64_t n_items;
    for (t = 0; t < n_tiles; t++) t_len[t] = node_indptr[t_node[t] + 1] - node_indptr[t_node[t]];
    for (;;) {
        n_items = 0;
        for (t = 0; t < n_tiles; t++) {
            t_chunks[t] = clamp_chunks(ceil(tile_cost[t] / target), t_len[t], min_chunk_tokens);
            n_items += t_chunks[t];
        }
        n_items = fit_one_wave(tile_cost, t_len, t_node, n_tiles, target, target_items, min_chunk_tokens, t_chunks,
                               n_items);
        if (n_items < 0) {
            status = DEFT_NO_MEMORY;
            goto done;
        }
        if (cap_items < 0 || n_items <= cap_items) break;
        target *= 1.5; /* coarsen the chunks until the plan fits a fixed capacity */
    }

    /* Items in (kv_start, q_start) order: group after group, chunk after chunk (chunk k of n covers
     * [len * k / n, len * (k + 1) / n)), each chunk's tiles in query order. Tiles of a group are
     * adjacent and cut alike (same length and cost). */
    item_mem = malloc(sizeof(int64_t) * (8 * n_items + 1));
    if (!item_mem) {
        status = DEFT_NO_MEMORY;
        goto done;
    }
    int64_t *i_start = item_mem, *i_len = item_mem + n_items, *i_qs = item_mem + 2 * n_items;
    int64_t *i_qc = item_mem + 3 * n_items, *key = item_mem + 4 * n_items, *order = item_mem + 5 * n_items;
    int64_t *spare = item_mem + 6 * n_items, *slot = item_mem + 7 * n_items;
    int64_t n = 0;
    for (t = 0; t < n_tiles;) {
        int64_t g_end = t + 1;
        while (g_end < n_tiles && t_node[g_end] == t_node[t]) g_end++;
        const int64_t base = node_indptr[t_node[t]], len = node_indptr[t_node[t] + 1] - base;
        const int64_t chunks = t_chunks[t];
        for (int64_t k = 0; k < chunks; k++) {
            const int64_t start = base + len * k / chunks, end = base + len * (k + 1) / chunks;
            for (int64_t u = t; u < g_end; u++, n++) {
                i_start[n] = start;
                i_len[n] = end - start;
                i_qs[n] = t_qs[u];
                i_qc[n] = t_qc[u];
                /* Large items first, longest first (a tail of short programs balances the SMs); then
                 * small items alike; ties keep (kv_start, q_start), so query tiles of one chunk stay
                 * adjacent (the repeat reads of its KV hit L2). kv_len lies in [1, T]. */
                key[n] = t_small[u] * (T + 1) + (T - i_len[n]);
                order[n] = n;
            }
        }
        t = g_end;
    }
    /* Stable LSD radix sort of ``order`` by key, a byte per pass, as many passes as the keys need. */
    int64_t max_key = 0;
    for (int64_t j = 0; j < n_items; j++) max_key = key[j] > max_key ? key[j] : max_key;
    for (int shift = 0; shift < 64 && (max_key >> shift) != 0; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t j = 0; j < n_items; j++) count[((key[order[j]] >> shift) & 255) + 1]++;
        for (int d = 0; d < 256; d++) count[d + 1] += count[d];
        for (int64_t j = 0; j < n_items; j++) spare[count[(key[order[j]] >> shift) & 255]++] = order[j];
        int64_t *swap = order;
        order = spare;
        spare = swap;
    }
    int64_t num_large = 0, partials = 0;
    for (int64_t j = 0; j < n_items; j++) {
        slot[j] = partials; /* partials of item j (in order): one per query row */
        partials += i_qc[order[j]];
        num_large += key[order[j]] <= T;
    }

    /* Merge lists: the query at qperm position p gets slot + (p - q_start) from every item covering p,
     * in item order (fixed, so stage 2 is deterministic): a counting sort of the partials by query. */
    part_mem = malloc(sizeof(int64_t) * (partials + B + 2));
    if (!part_mem) {
        status = DEFT_NO_MEMORY;
        goto done;
    }
    int64_t *query_of_slot = part_mem, *cursor = part_mem + partials;
    for (int64_t j = 0, s = 0; j < n_items; j++)
        for (int64_t r = 0; r < i_qc[order[j]]; r++) query_of_slot[s++] = qperm[i_qs[order[j]] + r];

    if (cap_items < 0) cap_items = n_items;
    const int64_t o_items = aligned(cap_queries), o_counts = aligned(o_items + cap_items * ITEM_FIELDS);
    const int64_t o_indptr = aligned(o_counts + 3), o_slots = aligned(o_indptr + cap_queries + 1);
    info[INFO_PACKED_LEN] = o_slots + partials;
    info[INFO_ITEMS] = n_items;
    info[INFO_LARGE_ITEMS] = num_large;
    info[INFO_PARTIALS] = partials;
    info[INFO_O_ITEMS] = o_items;
    info[INFO_O_COUNTS] = o_counts;
    info[INFO_O_INDPTR] = o_indptr;
    info[INFO_O_SLOTS] = o_slots;
    if (o_slots + partials > out_len) goto done; /* the caller grows ``out`` */

    memset(out, 0, sizeof(int32_t) * (o_slots + partials));
    memcpy(out, qperm, sizeof(int32_t) * B);
    for (int64_t j = 0; j < n_items; j++) {
        int32_t *item = out + o_items + j * ITEM_FIELDS;
        item[0] = (int32_t)i_start[order[j]];
        item[1] = (int32_t)i_len[order[j]];
        item[2] = (int32_t)i_qs[order[j]];
        item[3] = (int32_t)i_qc[order[j]];
        item[4] = (int32_t)slot[j];
    }
    out[o_counts] = (int32_t)num_large;
    out[o_counts + 1] = (int32_t)(n_items - num_large);
    out[o_counts + 2] = (int32_t)B;
    int32_t *indptr = out + o_indptr;
    memset(cursor, 0, sizeof(int64_t) * (B + 1));
    for (int64_t s = 0; s < partials; s++) cursor[query_of_slot[s] + 1]++;
    for (int64_t b = 0; b < B; b++) cursor[b + 1] += cursor[b];
    for (int64_t b = 0; b <= B; b++) indptr[b] = (int32_t)cursor[b];
    for (int64_t b = B + 1; b <= cap_queries; b++) indptr[b] = (int32_t)partials; /* queries past B merge nothing */
    for (int64_t s = 0; s < partials; s++) out[o_slots + cursor[query_of_slot[s]]++] = (int32_t)s;

done:
    free(node_mem);
    free(qperm);
    free(tile_mem);
    free(tile_cost);
    free(item_mem);
    free(part_mem);
    return status;
}
