/* QEMU TCG plugin for bench/boot-insns.sh: counts the guest instructions executed (all vCPUs;
 * the bench guests have one) and prints the running count each time the guest enters one of the
 * addresses given as arguments, plus the total when QEMU exits. A count of instructions does not
 * depend on how loaded the host is, so it is the boot figure that carries over to other machines.
 *
 * Build: cc -shared -fPIC -O2 -o insn-count.so insn-count.c
 * Use:   qemu-system-x86_64 ... -plugin ./insn-count.so,mark=NAME@HEXADDR,mark=...,out=FILE[,profile=N]
 * Out:   "mark NAME HIT INSNS HOST_MS REP_ITERS" lines, then "total INSNS HOST_MS REP_ITERS", then
 *        with profile=N the N costliest blocks as "block PC INSNS IS_REP_STRING"
 *
 * The few plugin API declarations it needs are written out here because Debian ships no
 * qemu-plugin.h; they match the stable plugin API version 1 (QEMU 4.2 to 8.x). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
typedef struct qemu_info_t qemu_info_t;
typedef void (*tb_trans_cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_cb)(unsigned int vcpu_index, void *userdata);
typedef void (*udata_cb)(qemu_plugin_id_t id, void *userdata);
enum { INLINE_ADD_U64 = 0 };
enum { CB_NO_REGS = 0 };

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, int op, void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, vcpu_udata_cb cb, int flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb cb, void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

#define MAX_MARKS 16
/* Per-mark hit reports are capped so a hot function cannot flood the output. */
#define MAX_HITS 8

struct mark {
    char name[64];
    uint64_t addr;
    unsigned hits;
};

static uint64_t insns;
/* Repeats of rep-prefixed string instructions (rep movs/stos/...): TCG runs one iteration per
 * block execution, so `insns` counts a 4 KiB `rep stosb` as 4096 instructions, where a core with
 * fast string operations retires it in a few dozen cycles. Reported separately so the figures
 * can be read both ways. */
static uint64_t rep_iters;
static struct mark marks[MAX_MARKS];
static int n_marks;
static FILE *out;
static struct timespec t_start;

/* Host wall-clock milliseconds since the plugin was installed (load-dependent, for context). */
static double host_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t_start.tv_sec) * 1e3 + (t.tv_nsec - t_start.tv_nsec) / 1e6;
}

/* profile=N: per translated block execution counters, the N hottest start addresses printed at
 * exit (weighted by instructions) so bench/boot-insns.sh can name the functions that cost most. */
struct block {
    uint64_t pc;
    uint64_t n_insns;
    uint64_t execs;
    int rep;
};
static struct block *blocks;
static size_t n_blocks, cap_blocks;
static int profile_top;
static struct block **chunks;
static size_t n_chunks;

/* Whether the instruction at CODE (LEN bytes, 64-bit mode) is a rep-prefixed string operation:
 * legacy prefixes, then an optional REX byte, then one of the string opcodes. */
static int is_rep_string(const uint8_t *code, size_t len)
{
    size_t i = 0;
    int rep = 0;
    for (; i < len; i++) {
        uint8_t b = code[i];
        if (b == 0xf2 || b == 0xf3) {
            rep = 1;
        } else if (!(b == 0xf0 || b == 0x2e || b == 0x36 || b == 0x3e || b == 0x26 || b == 0x64 ||
                     b == 0x65 || b == 0x66 || b == 0x67)) {
            break;
        }
    }
    if (i < len && (code[i] & 0xf0) == 0x40) {
        i++;
    }
    if (!rep || i >= len) {
        return 0;
    }
    uint8_t op = code[i];
    return (op >= 0xa4 && op <= 0xa7) || (op >= 0xaa && op <= 0xaf) || (op >= 0x6c && op <= 0x6f);
}

static void on_mark(unsigned int vcpu, void *udata)
{
    struct mark *m = udata;
    (void)vcpu;
    if (m->hits++ < MAX_HITS) {
        fprintf(out, "mark %s %u %" PRIu64 " %.0f %" PRIu64 "\n", m->name, m->hits, insns, host_ms(),
                rep_iters);
        fflush(out);
    }
}

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    (void)id;
    /* The mark callback runs before this block's own instructions are added: the count is the
     * work done before the marked function was entered. */
    for (int i = 0; i < n_marks; i++) {
        if (marks[i].addr == pc) {
            qemu_plugin_register_vcpu_tb_exec_cb(tb, on_mark, CB_NO_REGS, &marks[i]);
        }
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
    /* TCG ends a block after a rep string instruction and jumps back to it for each further
     * iteration, so a one-instruction block holding one is entered once per repeat. */
    int rep = 0;
    if (qemu_plugin_tb_n_insns(tb) == 1) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, 0);
        rep = is_rep_string(qemu_plugin_insn_data(insn), qemu_plugin_insn_size(insn));
        if (rep) {
            qemu_plugin_register_vcpu_tb_exec_inline(tb, INLINE_ADD_U64, &rep_iters, 1);
        }
    }
    if (profile_top) {
        /* Blocks are never freed or moved once handed to QEMU, so grow in fixed chunks. */
        if (n_blocks == cap_blocks) {
            cap_blocks = 1 << 16;
            blocks = calloc(cap_blocks, sizeof *blocks);
            n_blocks = 0;
            if (!blocks) {
                profile_top = 0;
                return;
            }
            struct block **list = realloc(chunks, (n_chunks + 1) * sizeof *chunks);
            if (!list) {
                profile_top = 0;
                return;
            }
            chunks = list;
            chunks[n_chunks++] = blocks;
        }
        struct block *b = &blocks[n_blocks++];
        b->pc = pc;
        b->n_insns = qemu_plugin_tb_n_insns(tb);
        b->rep = rep;
        qemu_plugin_register_vcpu_tb_exec_inline(tb, INLINE_ADD_U64, &b->execs, 1);
    }
}

static int by_cost(const void *a, const void *b)
{
    const struct block *x = a, *y = b;
    uint64_t cx = x->execs * x->n_insns, cy = y->execs * y->n_insns;
    return cx < cy ? 1 : cx > cy ? -1 : 0;
}

static void print_profile(void)
{
    size_t total = 0, k = 0;
    for (size_t c = 0; c < n_chunks; c++) {
        total += (c + 1 == n_chunks) ? n_blocks : (size_t)1 << 16;
    }
    struct block *all = calloc(total ? total : 1, sizeof *all);
    if (!all) {
        return;
    }
    for (size_t c = 0; c < n_chunks; c++) {
        size_t n = (c + 1 == n_chunks) ? n_blocks : (size_t)1 << 16;
        memcpy(all + k, chunks[c], n * sizeof *all);
        k += n;
    }
    qsort(all, total, sizeof *all, by_cost);
    for (size_t i = 0; i < total && i < (size_t)profile_top; i++) {
        fprintf(out, "block %" PRIx64 " %" PRIu64 " %d\n", all[i].pc, all[i].execs * all[i].n_insns, all[i].rep);
    }
    free(all);
}

static void on_atexit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    fprintf(out, "total %" PRIu64 " %.0f %" PRIu64 "\n", insns, host_ms(), rep_iters);
    if (profile_top) {
        print_profile();
    }
    fflush(out);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    (void)info;
    out = stderr;
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = fopen(argv[i] + 4, "a");
            if (!out) {
                perror(argv[i] + 4);
                return -1;
            }
        } else if (strncmp(argv[i], "profile=", 8) == 0) {
            profile_top = atoi(argv[i] + 8);
        } else if (strncmp(argv[i], "mark=", 5) == 0 && n_marks < MAX_MARKS) {
            char *at = strchr(argv[i] + 5, '@');
            if (!at) {
                fprintf(stderr, "insn-count: mark=NAME@HEXADDR, got %s\n", argv[i]);
                return -1;
            }
            struct mark *m = &marks[n_marks++];
            snprintf(m->name, sizeof m->name, "%.*s", (int)(at - argv[i] - 5), argv[i] + 5);
            m->addr = strtoull(at + 1, NULL, 16);
        } else {
            fprintf(stderr, "insn-count: unknown argument %s\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_atexit_cb(id, on_atexit, NULL);
    return 0;
}
