#!/usr/bin/env bash
# Run a command detached from opskit: `detach.sh RUN_DIR CMD...` (started in its own session by agent.py).
# Appends the command's output to RUN_DIR/run.log and writes RUN_DIR/exit_code when it ends.
# TERM/INT/USR1/HUP are forwarded to the command as TERM (the trainer checkpoints, then exits 75).
# The run-directory contract's names (train/contract.py; tests/test_structure.py keeps them equal):
LOG=run.log EXIT_CODE=exit_code
run_dir=$1; shift
cd "$run_dir" || exit 97
rm -f $EXIT_CODE
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} started $(date -u +%FT%TZ) on $(hostname) pid $$: $*" >> $LOG
"$@" >> $LOG 2>&1 < /dev/null &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT USR1 HUP
while :; do
  wait $child; rc=$?
  kill -0 $child 2>/dev/null || break
done
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} ended $(date -u +%FT%TZ) with exit code $rc" >> $LOG
echo $rc > .$EXIT_CODE.tmp && mv .$EXIT_CODE.tmp $EXIT_CODE
