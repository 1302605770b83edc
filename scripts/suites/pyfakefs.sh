#!/usr/bin/env bash
# pyfakefs real-file-system tests: every TestCase in pyfakefs/tests whose
# use_real_fs() is True (RealFsTestCase subclasses run with TEST_REAL_FS=1),
# plus fake_filesystem_vs_real_test (which compares against the real fs).
# Runs as an unprivileged user with TMPDIR inside DIR.
# Usage: pyfakefs.sh DIR [--quick]   (--quick changes nothing: it takes ~10 s)
SUITE=pyfakefs
source "$(dirname "$0")/lib.sh"
parse_args "$@"
trap cleanup_work EXIT

VENV="$CACHE/pyfakefs-venv"
PYFAKEFS_VERSION="${FSVA_PYFAKEFS_VERSION:-6.3.2}"

# ---- install (idempotent) ----
if ! "$VENV/bin/python" -c "import pyfakefs, sys; sys.exit(pyfakefs.__version__ != '$PYFAKEFS_VERSION')" 2>/dev/null; then
    log "installing pyfakefs $PYFAKEFS_VERSION into $VENV"
    command -v /usr/bin/python3 >/dev/null || apt_install python3 python3
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check "pyfakefs==$PYFAKEFS_VERSION" >&2
    chmod -R a+rX "$VENV"
fi

# ---- run ----
TMP="$WORK/tmp"
mkdir -p "$TMP"
chown -R "$NOBODY_UID:$NOBODY_GID" "$WORK"
RUNNER="$WORK/run_realfs.py"
cat > "$RUNNER" <<'PY'
import importlib, inspect, os, sys, unittest
import pyfakefs.tests as T
tdir = os.path.dirname(T.__file__)
mods = sorted(f[:-3] for f in os.listdir(tdir) if f.endswith("_test.py"))
suite = unittest.TestSuite()
loader = unittest.TestLoader()
for m in mods:
    try:
        mod = importlib.import_module("pyfakefs.tests." + m)
    except Exception as e:  # optional deps missing (e.g. pandas): not a real-fs test
        print(f"skip module {m}: {e}", file=sys.stderr)
        continue
    for name, cls in inspect.getmembers(mod, inspect.isclass):
        if cls.__module__ != mod.__name__ or not issubclass(cls, unittest.TestCase):
            continue
        real = m == "fake_filesystem_vs_real_test"
        if not real and hasattr(cls, "use_real_fs"):
            try:
                real = bool(cls.use_real_fs(cls.__new__(cls)))
            except Exception:
                real = False
        if real:
            suite.addTests(loader.loadTestsFromTestCase(cls))

class R(unittest.TextTestResult):
    pass
res = unittest.TextTestRunner(verbosity=1, resultclass=R, stream=sys.stderr).run(suite)
failed = [t.id() for t, _ in res.failures + res.errors + [(u, None) for u in res.unexpectedSuccesses]]
with open(sys.argv[1], "w") as f:
    for i in failed:
        f.write(i.removeprefix("pyfakefs.tests.") + "\n")
total = res.testsRun
skipped = len(res.skipped)
xfail = len(res.expectedFailures)
print(f"COUNTS {total - len(failed) - skipped} {len(failed)} {skipped}")
PY
IDS="$WORK/failed-ids"
touch "$IDS"; chown "$NOBODY_UID:$NOBODY_GID" "$IDS" "$RUNNER"
log "running real-fs tests as uid $NOBODY_UID with TMPDIR=$TMP"
set +e
OUT="$(cd "$TMP" && as_nobody env -i PATH=/usr/bin:/bin HOME="$TMP" TMPDIR="$TMP" TEST_REAL_FS=1 \
        PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
        timeout 600 "$VENV/bin/python" "$RUNNER" "$IDS" 2> "$WORK/log")"
rc=$?
set -e
tail -n 60 "$WORK/log" | grep -v '^\.*s*$' >&2 || true
COUNTS="$(grep '^COUNTS ' <<<"$OUT" || true)"
[ -n "$COUNTS" ] || die "runner produced no counts (rc=$rc)"
read -r _ P F S <<<"$COUNTS"
finish "$P" "$F" "$S" "$IDS"
