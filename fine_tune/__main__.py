"""`python -m fine_tune [overrides]`: compose the config, run one job, return the metric to sweepers.

Kept thin on purpose: nothing heavy is imported at module level, so `--help` and `--cfg job` answer
in about a second. The work happens in `fine_tune.run`."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import fine_tune.sweep  # noqa: F401  registers the `fine_tune.job_subdir` resolver used by hydra.sweep.subdir
from fine_tune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError, report
from fine_tune.schema import register_configs

register_configs()  # typed run-level keys at compose time (conf/config.yaml: fine_tune_schema)

log = logging.getLogger("fine_tune")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from fine_tune import modes, secrets, sweep
    from fine_tune.run import job_info, run

    run_dir, job = job_info()
    multirun = job["sweep_dir"] is not None
    try:
        secrets.guard(cfg, run_dir)  # a token in the config: refuse, scrub Hydra's saved copies
        if modes.selected(cfg):
            return modes.dispatch(cfg, run_dir)
    except UserError as error:
        report(error)
        if multirun:
            return None
        sys.exit(EXIT_USER_ERROR)
    if multirun and sweep.should_skip(run_dir):
        log.info("skipping %s: it finished in an earlier run of this sweep", run_dir)
        return sweep.finished_metric(run_dir)
    sweep.mark_running(run_dir, job["overrides"])
    try:
        metric = run(cfg, run_dir, job)
    except UserError as error:
        sweep.mark_failed(run_dir, str(error))
        report(error)
        if multirun:
            return None  # the sweep goes on; its summary lists this job as failed
        sys.exit(EXIT_USER_ERROR)
    except Preempted as error:  # checkpoint saved: requeue with resume=true
        sweep.mark_preempted(run_dir, str(error))
        log.warning("preempted: %s; rerun with resume=true (same run dir) to continue", error)
        error.forward_signal()  # submitit's SIGUSR2 handler requeues the SLURM job here
        sys.exit(EXIT_PREEMPTED)
    except Exception as error:
        sweep.mark_failed(run_dir, f"{type(error).__name__}: {error}", oom=sweep.is_oom(error))
        if multirun:
            log.exception("job failed; the sweep goes on")
            return None
        raise
    sweep.mark_finished(run_dir, metric)
    return metric


if __name__ == "__main__":
    try:
        main()
    finally:  # under torchrun: a process that does not end soon after its job says where it hangs
        from fine_tune.distributed import exit_watchdog

        exit_watchdog()
