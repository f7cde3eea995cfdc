#!/bin/sh
# QEMU wrapper for the benchmarks: the runtime runs it through ROOTCELL_QEMU, and it appends
# $BENCH_QEMU_EXTRA (split on spaces) to the runtime's own command line, e.g. an instruction
# counting -plugin or `-icount shift=3,sleep=off`. BENCH_RTC_ON=1 also flips the runtime's
# microvm rtc=off to rtc=on (see bench/README.md for why that matters under TCG).
q=${QEMU:-qemu-system-x86_64}
if [ "${BENCH_RTC_ON:-0}" = 1 ]; then
    for a in "$@"; do
        shift
        case "$a" in microvm,*) a=$(echo "$a" | sed 's/rtc=off/rtc=on/') ;; esac
        set -- "$@" "$a"
    done
fi
# shellcheck disable=SC2086
exec "$q" "$@" ${BENCH_QEMU_EXTRA:-}
