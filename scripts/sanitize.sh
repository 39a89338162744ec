#!/usr/bin/env bash
# Run the tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the kernels.
#
#   scripts/sanitize.sh            every test file but the packaging ones (several minutes)
#   scripts/sanitize.sh --quick    the hardening tests, fewer examples, a short fuzz run (about two minutes)
#   scripts/sanitize.sh --keep     keep the throw-away tree (its path is printed)
#   scripts/sanitize.sh -- tests/test_kernels.py -k gather     run just these pytest arguments
#
# The extension is built with FASTEMBED_SANITIZE=1 (setup.py: -fsanitize=address,undefined,
# -fno-sanitize-recover=undefined) in a throw-away copy of the working tree, never in place: other
# people import the in-place build. Python itself is not instrumented, so libasan is preloaded.
# Every Python process (pytest, and the children some tests start) writes its sanitizer reports to
# files, which this script collects. Each test file runs in its own pytest process, because the
# first report ends a process (halt_on_error=1, and UBSan errors are not recoverable in this build).
#
# Exit status: 0 when there is no sanitizer report, every test passed and every pytest process
# collected tests; 1 otherwise (a report, a failing test, a process that died, a file that collected
# nothing); 2 when the build fails. --lenient-tests lists failing tests without failing on them
# (for hunting sanitizer reports while a test is known to fail).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
QUICK=0
KEEP=0
STRICT_TESTS=1
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --keep) KEEP=1 ;;
        --strict-tests) STRICT_TESTS=1 ;;  # the default; kept so older command lines still work
        --lenient-tests) STRICT_TESTS=0 ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "sanitize.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if ! "$PYTHON" -c 'import Cython, setuptools, numpy, pytest, hypothesis' 2>/dev/null; then
    echo "sanitize: $PYTHON needs the build and test requirements:" \
         "$PYTHON -m pip install 'cython>=3.1' setuptools numpy pytest hypothesis" >&2
    exit 2
fi
START=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastembed-sanitize.XXXXXX")"
cleanup() {
    if [ "$KEEP" = 1 ]; then echo "sanitize: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---- a copy of the working tree (uncommitted changes included), without build products
tar -C "$ROOT" \
    --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' --exclude=./fastembed/_kernels.c \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache \
    --exclude=./bench/results --exclude='./.venv*' -cf - . | tar -C "$WORK" -xf -
cd "$WORK"

echo "sanitize: building the ASan+UBSan extension in $WORK"
if ! FASTEMBED_SANITIZE=1 "$PYTHON" setup.py build_ext --inplace > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    echo "sanitize: the build failed" >&2
    exit 2
fi
SO="$(ls "$WORK"/fastembed/_kernels*.so)"
LIBASAN="$(gcc -print-file-name=libasan.so)"
if [ ! -e "$LIBASAN" ] || [ "$LIBASAN" = "libasan.so" ]; then
    echo "sanitize: gcc does not know where libasan.so is" >&2
    exit 2
fi
if ! grep -q libasan <<< "$(ldd "$SO")"; then  # (not `ldd | grep -q`: with pipefail, grep's early exit fails ldd)
    echo "sanitize: $SO is not linked against libasan (FASTEMBED_SANITIZE ignored?)" >&2
    exit 2
fi

REPORTS="$WORK/reports"
mkdir -p "$REPORTS"
# libstdc++ too: a C++ extension loaded later (torch) throws through ASan's __cxa_throw interceptor,
# which needs the real one resolvable at startup ("CHECK failed: real___cxa_throw" otherwise).
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so.6)"
[ -e "$LIBSTDCXX" ] || LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
export LD_PRELOAD="$LIBASAN${LIBSTDCXX:+:$LIBSTDCXX}${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython's own allocations at exit would flood the report.
# allocator_may_return_null + max_allocation_size_mb: a huge allocation (the fuzzer asks for some) fails
# with MemoryError instead of being granted and filled.
# exitcode=86: a process a sanitizer stopped is told apart from a test failure (pytest's 1).
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:allocator_may_return_null=1:max_allocation_size_mb=4096:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=86:log_path=$REPORTS/ubsan"
export PYTHONMALLOC=malloc          # Python objects through malloc, where ASan sees them
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1
export FASTEMBED_SANITIZER=1        # tests skip what cannot be measured under ASan (malloc statistics)

where="$("$PYTHON" -c 'import fastembed; print(fastembed._kernels.__file__)')"
case "$where" in
    "$WORK"/*) ;;
    *) echo "sanitize: fastembed was imported from $where, not from the sanitized copy" >&2; exit 2 ;;
esac

RUNS=()
if [ "$QUICK" = 1 ]; then
    export FASTEMBED_HARDENING_EXAMPLES="${FASTEMBED_HARDENING_EXAMPLES:-50}"
    export FASTEMBED_FUZZ_SECONDS="${FASTEMBED_FUZZ_SECONDS:-15}"
    export FASTEMBED_LEAK_CALLS="${FASTEMBED_LEAK_CALLS:-2000}"
    RUNS=(tests/test_hardening_inputs.py tests/test_hardening_optim.py tests/test_hardening_offsets.py
          tests/test_hardening_threads.py tests/test_hardening_leaks.py tests/test_hardening_fuzz.py
          tests/test_errors.py tests/test_kernels.py tests/test_dtypes.py tests/test_bag.py tests/test_exchange_plan.py)
else
    export FASTEMBED_LEAK_CALLS="${FASTEMBED_LEAK_CALLS:-5000}"
    export FASTEMBED_FUZZ_SECONDS="${FASTEMBED_FUZZ_SECONDS:-60}"
    RUNS=()
    for f in tests/test_*.py; do
        case "$f" in tests/test_packaging.py) continue ;; esac  # builds wheels and venvs: not kernel code
        RUNS+=("$f")
    done
fi

died=()
failed=()
run_pytest() {  # run_pytest LABEL PYTEST-ARGS...: one pytest process, its outcome recorded
    local label="$1" t0 rc summary
    shift
    t0=$(date +%s)
    set +e
    "$PYTHON" -m pytest -q -p no:cacheprovider --tb=short -W ignore::DeprecationWarning "$@" > "$WORK/pytest.log" 2>&1
    rc=$?
    set -e
    summary="$(grep -E ' in [0-9.]+s' "$WORK/pytest.log" | tail -1 || true)"
    printf 'sanitize: %-40s rc=%-3s %4ss  %s\n' "$label" "$rc" "$(( $(date +%s) - t0 ))" "$summary"
    if [ "$rc" -eq 5 ]; then
        died+=("$label (collected no tests)")
    elif [ "$rc" -ge 2 ] || [ -z "$summary" ]; then
        died+=("$label (exit $rc)")
        tail -30 "$WORK/pytest.log" | sed 's/^/    | /'
    elif [ "$rc" -eq 1 ]; then
        failed+=("$label")
        grep -E '^(FAILED|ERROR) ' "$WORK/pytest.log" | sed 's/^/    | /' | head -20 || true
    fi
    cp "$WORK/pytest.log" "$REPORTS/pytest-$(echo "$label" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-80).log"
}

if [ ${#PYTEST_ARGS[@]} -gt 0 ]; then
    run_pytest "${PYTEST_ARGS[*]}" "${PYTEST_ARGS[@]}"
else
    for run in "${RUNS[@]}"; do
        run_pytest "$run" "$run"
    done
fi

# Anything a sanitizer wrote is a report, except the warnings of a huge allocation refused as asked.
reports=$(grep -l -v -E '^==[0-9]+==WARNING: AddressSanitizer failed to allocate' \
          "$REPORTS"/asan* "$REPORTS"/ubsan* 2>/dev/null | sort || true)
echo
echo "sanitize: $(( $(date +%s) - START ))s in all; $(echo "$reports" | grep -c . || true) sanitizer reports"
for r in $reports; do
    echo "==================== $(basename "$r")"
    grep -E 'Sanitizer|runtime error:|SUMMARY:|^    #[0-9]+ .*(_kernels|fastembed)' "$r" | grep -v 'failed to allocate' | head -25
done
status=0
if [ -n "$reports" ]; then
    echo "sanitize: FAILED: sanitizer reports above (the full reports: run again with --keep)"
    status=1
fi
if [ ${#died[@]} -gt 0 ]; then
    echo "sanitize: FAILED: a test process died or pytest could not run: ${died[*]}"
    status=1
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "sanitize: FAILED: tests failed (not sanitizer reports): ${failed[*]}"
    if [ "$STRICT_TESTS" = 1 ]; then status=1; else echo "sanitize: (--lenient-tests: not counted)"; fi
fi
[ "$status" = 0 ] && echo "sanitize: OK, no sanitizer report"
exit $status
