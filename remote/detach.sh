#!/usr/bin/env bash
# Run a command detached from opskit: `detach.sh RUN_DIR CMD...` (started in its own session by agent.py).
# Appends the command's output to RUN_DIR/run.log and writes RUN_DIR/exit_code when it ends, also on a
# full disk (the file's room is taken at the start). TERM/INT/USR1/HUP are forwarded to the command as
# TERM (the trainer checkpoints, then exits 75). A run started by a queue's supervisor then asks for
# that supervisor (agent.py ensure-supervisor), so one that died meanwhile is started again.
# The run-directory contract's names (train/contract.py; tests/test_structure.py keeps them equal):
LOG=run.log EXIT_CODE=exit_code
run_dir=$1; shift
cd "$run_dir" || exit 97
rm -f $EXIT_CODE
printf '%-15s\n' '' > .$EXIT_CODE.reserve 2>/dev/null
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} started $(date -u +%FT%TZ) on $(hostname) pid $$: $*" >> $LOG
"$@" >> $LOG 2>&1 < /dev/null &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT HUP USR1
while :; do
  wait $child; rc=$?
  kill -0 $child 2>/dev/null || break
done
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} ended $(date -u +%FT%TZ) with exit code $rc" >> $LOG 2>/dev/null
# Over the reserved bytes in place (no new block needed), else a new file; the rename is atomic.
{ printf '%-15s\n' "$rc" 1<> .$EXIT_CODE.reserve && mv .$EXIT_CODE.reserve $EXIT_CODE; } 2>/dev/null \
  || { echo $rc > .$EXIT_CODE.tmp && mv .$EXIT_CODE.tmp $EXIT_CODE; } 2>/dev/null || rm -f .$EXIT_CODE.tmp
rm -f .$EXIT_CODE.reserve
if [ -n "${OPSKIT_QUEUE_ENTRY:-}" ] && [ -n "${OPSKIT_AGENT_PYTHON:-}" ]; then
  unset_run_env=()
  for key in ${OPSKIT_RUN_ENV_KEYS:-}; do unset_run_env+=(-u "$key"); done
  env "${unset_run_env[@]}" "$OPSKIT_AGENT_PYTHON" -S "$(dirname "$0")/agent.py" ensure-supervisor \
    --workdir "${OPSKIT_QUEUE_ENTRY%#*}" > /dev/null 2>&1 < /dev/null || true
fi
exit 0
