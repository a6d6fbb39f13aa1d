# Shell helpers of the prepared GPU run (sourced by gpu_check.sh, fetch_wheels.sh and the tests).
#
# run_step LIMIT_S CMD...  CMD under a time limit: SIGINT at the limit (Python raises KeyboardInterrupt
#     and the scripts write what they measured; pytest, xdist included, writes its junit file, which
#     it does not on SIGTERM), SIGKILL GRACE_S (default 20) seconds later. `timeout` also restores a
#     default SIGINT where the caller's shell ignores it. Prints the outcome and wall time; returns
#     the command's status (124: stopped at the limit, 137: killed after the grace period).
# install_package PY  makes `import llave_fast.kernels` work for PY from this tree: an offline
#     editable install (no index, no build isolation, no dependencies) checked by importing; where
#     that fails, a copy of the package with its links resolved under $SHIM_DIR, first on PYTHONPATH
#     (PYTHONSAFEPATH=1). Returns 1 with a clear message when neither works.
# transformers_floor  prints the transformers release stage T needs (ZERO3_MIN_TRANSFORMERS in
#     llave_fast/training/engine.py, read from the repository root; fetch_wheels.sh carries it, stage
#     T0 installs it); returns 1 with a message on stderr when the constant is not found.

transformers_floor() {
    local v
    v=$(grep -oP '^ZERO3_MIN_TRANSFORMERS = "\K[^"]+' llave_fast/training/engine.py) || true
    [ -n "$v" ] || { echo "FATAL: no ZERO3_MIN_TRANSFORMERS in llave_fast/training/engine.py" >&2; return 1; }
    echo "$v"
}

run_step() {
    local limit=$1
    shift
    local t0 rc
    t0=$(date +%s)
    timeout -s INT -k "${GRACE_S:-20}" "$limit" "$@"
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) echo "--- step done in $dt s" ;;
        124) echo "--- step STOPPED at its limit of $limit s (SIGINT): what it wrote so far is kept" ;;
        137) echo "--- step KILLED ${GRACE_S:-20} s after SIGINT at its limit of $limit s: only files written before are kept" ;;
        130) echo "--- step INTERRUPTED after $dt s (exit 130): what it wrote so far is kept" ;;
        *) echo "--- step FAILED with exit status $rc after $dt s" ;;
    esac
    return $rc
}

_kernels_import_check() {
    "$1" -c "import llave_fast.kernels, llave_fast.backends.triton_backend; import llave_fast, os; print('llave_fast from', os.path.dirname(llave_fast.__file__))"
}

install_package() {
    local py=$1
    echo "installing llave-fast from this tree (offline, editable, no dependencies)"
    if run_step "${INSTALL_LIMIT_S:-90}" "$py" -m pip install --no-deps --no-build-isolation --no-index -q -e . ; then
        if _kernels_import_check "$py"; then
            return 0
        fi
        echo "the editable install ran, but 'import llave_fast.kernels' fails (above)"
    else
        echo "the editable install failed (above)"
    fi
    local shim=${SHIM_DIR:-/tmp/llave_fast_src}
    echo "falling back to a copy of the package under $shim (links resolved: llave_fast/kernels and llave_fast/configs as folders)"
    rm -rf "$shim" && mkdir -p "$shim" && cp -rL llave_fast "$shim/" || {
        echo "FATAL: could not copy the package to $shim"
        return 1
    }
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1
    if _kernels_import_check "$py"; then
        return 0
    fi
    echo "FATAL: 'import llave_fast.kernels' fails both from an editable install and from a copy of the"
    echo "       tree; nothing below can run. Check the traceback above (a missing dependency of the"
    echo "       package? torch, triton and numpy must already be installed on this machine)."
    return 1
}
