"""What the commands do, one user-level operation per function: each takes a Store and returns plain
data for the CLI to print; nothing here prints (progress goes through an optional `on_event`).

    targets.py  the targets the store knows          launch.py   launch, submitting one run
    status.py   refresh and the status rows          control.py  cancel, resume, logs, queues, runs show
    pull.py     artifacts into results/raw/          export.py   a run as a HF checkpoint
    cost.py     cost per run/config/phase/target, the boxes' idle time (from their ledgers)
"""
from opskit.operations.control import cancel, logs, queue_move_top, queue_view, resume, run_details
from opskit.operations.cost import box_views, cost, run_costs
from opskit.operations.export import export_run
from opskit.operations.launch import launch, submit_one
from opskit.operations.pull import pull
from opskit.operations.status import refresh, status_rows
from opskit.operations.targets import (add_target, check_target, get_target, list_targets, local_target_record,
                                       prepare_target, remove_target)

__all__ = ["add_target", "box_views", "cancel", "check_target", "cost", "export_run", "get_target", "launch", "list_targets",
           "local_target_record", "logs", "pull", "prepare_target", "queue_move_top", "queue_view", "refresh",
           "remove_target", "resume", "run_costs", "run_details", "status_rows", "submit_one"]
