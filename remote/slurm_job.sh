#!/usr/bin/env bash
# The two halves of a SLURM run's job (the sbatch script comes from opskit/targets/slurm/script.py):
#
#   slurm_job.sh node RUN_DIR CMD...   one srun task per node: run the trainer's torchrun. Node 0
#                                      appends its output to RUN_DIR/run.log, others to slurm/node<N>.log.
#   slurm_job.sh finish RUN_DIR RC     the batch step, after srun: a trainer stopped by a signal
#                                      (heartbeat "interrupted") is requeued unless opskit asked to cancel;
#                                      otherwise RC goes to RUN_DIR/exit_code and the run's end is POSTed
#                                      to the target's --notify URLs (remote/notify.py).
#
# Signals: SLURM sends USR1 (--signal, before the time limit; `opskit cancel`) to every process of the
# step. The trainer checkpoints on it and exits 75; torchrun starts with USR1 ignored so that it
# outlives the signal and reports its workers' exit. TERM (scancel, requeue) reaches everyone too.
# The run-directory contract's names (train/contract.py, opskit/targets/slurm/script.py;
# tests/test_structure.py keeps them equal):
LOG=run.log EXIT_CODE=exit_code STATUS=status.json HB_INTERRUPTED=interrupted SLURM_DIR=slurm CANCEL_MARKER=cancel NOTIFY_FILE=notify.json
mode=$1 run_dir=$2; shift 2
cd "$run_dir" || exit 97

if [ "$mode" = finish ]; then
  rc=$1
  cancelled=no  # opskit cancel writes this job's id to slurm/cancel before it signals
  [ "$(cat $SLURM_DIR/$CANCEL_MARKER 2>/dev/null)" = "$SLURM_JOB_ID" ] && cancelled=yes
  if grep -qs "\"state\": *\"$HB_INTERRUPTED\"" $STATUS && [ $cancelled = no ]; then
    echo "=== opskit: trainer stopped by a signal; requeueing SLURM job $SLURM_JOB_ID to resume it" >> $LOG
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "=== opskit: requeue refused (SLURM is already requeueing or ending the job)" >> $LOG
  fi
  echo "$rc" > .$EXIT_CODE.tmp && mv .$EXIT_CODE.tmp $EXIT_CODE
  # the target's --notify URLs hear how the run ended (bounded retries: the job must end soon)
  timeout 60 python3 "$(dirname "$0")/notify.py" run-ended "$run_dir" --conf $SLURM_DIR/$NOTIFY_FILE >> $LOG 2>&1 || true
  if [ $cancelled = yes ]; then scancel "$SLURM_JOB_ID"; fi  # SLURM records the job as cancelled too
  exit "$rc"
fi

node=${SLURM_NODEID:-0}
log=$LOG
if [ "$node" = 0 ]; then
  rm -f $EXIT_CODE  # a previous incarnation's must not end this one
else
  log=$SLURM_DIR/node$node.log
fi
args=()
for a in "$@"; do args+=("${a//\{rdzv\}/$OPSKIT_RDZV}"); done
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} started $(date -u +%FT%TZ) on $(hostname) (SLURM job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, node $node): ${args[*]}" >> "$log"
( trap '' USR1; exec "${args[@]}" ) >> "$log" 2>&1 < /dev/null &
child=$!
trap ':' USR1
trap 'kill -TERM $child 2>/dev/null' TERM INT HUP
while :; do
  wait $child; rc=$?
  kill -0 $child 2>/dev/null || break
done
echo "=== opskit attempt ${OPSKIT_ATTEMPT:-?} ended $(date -u +%FT%TZ) on node $node with exit code $rc" >> "$log"
exit $rc
