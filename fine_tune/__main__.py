"""`python -m fine_tune [overrides]`: compose the config, run one job, return the metric to sweepers.

Kept thin on purpose: nothing heavy is imported at module level, so `--help` and `--cfg job` answer
in about a second. The work happens in `fine_tune.run`; what a run directory keeps is
`fine_tune.run_dir`'s, what a resume composes `fine_tune.resume_config`'s."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import fine_tune.sweep  # noqa: F401  registers the `fine_tune.job_subdir` resolver used by hydra.sweep.subdir
from fine_tune.errors import EXIT_USER_ERROR, Preempted, UserError, report
from fine_tune.schema import register_configs

# The typed run-level keys (conf/config.yaml: fine_tune_schema) are an internal config group:
# registered for every command but --help, which would list it beside the groups users choose.
if not {"-h", "--help"} & set(sys.argv[1:]):
    register_configs()

log = logging.getLogger("fine_tune")


def before_training(cfg: DictConfig, run_dir: Path, multirun: bool) -> tuple[bool, float | None]:
    """What can end the job before it is announced: (True, metric) when a mode ran or the run had
    finished, (False, None) to train; UserError for what the user must fix."""
    from fine_tune import modes, secrets, sweep
    from fine_tune import run_dir as run_dirs
    from fine_tune.models.hub import use_cache_only_if_unreachable
    from fine_tune.resume_config import check_unchanged
    from fine_tune.training.checkpoints import requested
    from fine_tune.validate import check_config

    secrets.guard(cfg, run_dir)  # a token in the config: refuse, scrub Hydra's saved copies
    use_cache_only_if_unreachable(cfg)  # no network: fail now, not after a minute of retries
    if modes.selected(cfg):
        try:
            modes.dispatch(cfg)
            return True, None
        finally:
            run_dirs.discard_if_unused(run_dir)
    where = run_dirs.shown(run_dir)
    if sweep.should_skip(run_dir) and multirun:
        log.info("skipping %s: it finished in an earlier run of this sweep", where)
        return True, sweep.finished_metric(run_dir)
    if sweep.should_skip(run_dir) and requested(cfg.resume):
        log.info("%s finished earlier: nothing to do (its results are in metrics.json)", where)
        return True, sweep.finished_metric(run_dir)
    if requested(cfg.resume):
        check_unchanged(cfg, run_dir)
    elif not multirun and run_dirs.holds_training(run_dir):
        raise UserError(
            f"{where} already holds a run",
            where="hydra.run.dir",
            hint="continue it with resume=true, or start this one in another directory",
        )
    check_config(cfg)  # types, targets, cross-checks: before any weights or data load
    return False, None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from fine_tune.distributed import adopt_slurm_tasks, quiet_other_ranks
    from fine_tune.quiet import quiet_libraries

    adopt_slurm_tasks()  # srun / submitit tasks become torch ranks before anything distributed starts
    quiet_other_ranks()  # under torchrun: rank 0 says where the run is and how it went
    quiet_libraries()  # before anything imports transformers, peft or bitsandbytes
    from fine_tune import run_dir as run_dirs
    from fine_tune import sweep
    from fine_tune.run import job_info, run

    run_dir, job = job_info()
    multirun = job["sweep_dir"] is not None
    where = run_dirs.shown(run_dir)

    def refuse(error: UserError, announced: bool) -> None:
        """One paragraph; a single run exits 2 and leaves no directory it made and trained nothing in."""
        report(error)
        if multirun:
            return  # the sweep goes on; its summary lists this job as failed
        if run_dirs.discard_if_unused(run_dir) and announced:
            log.info("nothing was trained: removed %s", where)
        sys.exit(EXIT_USER_ERROR)

    try:
        done, metric = before_training(cfg, run_dir, multirun)
    except UserError as error:
        if multirun:
            sweep.mark_running(run_dir, job["overrides"])
            sweep.mark_failed(run_dir, str(error))
        refuse(error, announced=False)
        return None
    if done:
        return metric
    log.info("run directory: %s", where)
    sweep.mark_running(run_dir, job["overrides"])
    try:
        metric = run(cfg, run_dir, job)
    except UserError as error:
        sweep.mark_failed(run_dir, str(error))
        refuse(error, announced=True)
        return None
    except Preempted as error:  # checkpoint saved: requeue with resume=true
        sweep.mark_preempted(run_dir, str(error))
        log.warning("preempted: %s; continue with resume=true hydra.run.dir=%s", error, where)
        error.forward_signal()  # submitit's SIGUSR2 handler requeues the SLURM job here
        sys.exit(error.exit_code)
    except Exception as error:
        sweep.mark_failed(run_dir, f"{type(error).__name__}: {error}", oom=sweep.is_oom(error))
        log.error("failed; the run directory is %s", where)
        if multirun:
            log.exception("job failed; the sweep goes on")
            return None
        raise
    sweep.mark_finished(run_dir, metric)
    log.info("finished; everything is in %s", where)
    return metric


if __name__ == "__main__":
    from fine_tune.resume_config import with_saved_overrides

    sys.argv = with_saved_overrides(sys.argv)  # a resume composes the run's own overrides
    try:
        main()
    finally:  # under torchrun: a process that does not end soon after its job says where it hangs
        from fine_tune.distributed import exit_watchdog

        exit_watchdog()
