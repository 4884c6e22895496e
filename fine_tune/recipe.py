"""The Recipe: the one place where a run's objects are built from its config.

    tokenizer -> data -> model (+quant) -> adapter -> trainer (the method's TRL engine)

Training (`fine_tune.run`), `validate=true`, `preview=true`, `fine_tune.generate` and
`fine_tune.export` all build through it, so the same config gives the same tokenizer, data,
quantized base and adapter everywhere, and no other module builds data or models on its own. Each
object is built on first use and kept: `validate=true` reads the tokenizer and the data and never
touches the weights; generate and export load the base and a saved adapter and never the data.

The config must have passed `fine_tune.schema.check_types` (a run's, a mode's) or be a saved
run config (generate, export: the builders' signature defaults stand in for keys it predates).
Heavy libraries are imported inside the builders, never here at import time.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from fine_tune.adapters import ADAPTER_CONFIG
from fine_tune.errors import UserError

if TYPE_CHECKING:
    from fine_tune.data import DataBundle
    from fine_tune.training.methods import Method

log = logging.getLogger("fine_tune")


def init_adapter_dir(value: str | Path) -> Path:
    """`init_adapter=<run dir | adapter dir | checkpoint dir>` -> the directory holding the adapter."""
    path = Path(str(value)).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise UserError(
        f"'{path}' holds no trained adapter ({ADAPTER_CONFIG} in it or in its adapter/)",
        where="init_adapter",
        hint="give the directory of a finished run (it has adapter/), or a checkpoint-<step> directory",
    )


class Recipe:
    """Builds (once each) what a run is made of; see the module docstring."""

    def __init__(self, cfg: DictConfig, cache_data: bool = True) -> None:
        self.cfg = cfg
        self.cache_data = cache_data  # False: preview=true, which writes nothing

    # ---- tokenizer and data -----------------------------------------------------------------------
    @functools.cached_property
    def tokenizer(self) -> Any:
        """The first thing every tool (train, validate, preview, generate, export) loads."""
        from fine_tune.models.hub import use_cache_only_if_unreachable
        from fine_tune.models.tokenizer import build_tokenizer

        cfg = self.cfg
        use_cache_only_if_unreachable(cfg)  # no network: fail now, not after a minute of retries
        return build_tokenizer(cfg.model.tokenizer, cfg.model.name_or_path, cfg.model.trust_remote_code)

    @functools.cached_property
    def data(self) -> DataBundle:
        """The data bundle: what the run trains on, validate=true checks and preview=true shows."""
        from fine_tune.models.tokenizer import cache_root
        from fine_tune.utils.build import build
        from fine_tune.validate import check_method_data, check_prompts

        cache_dir = cache_root() / "data" if self.cache_data else None
        cfg = self.cfg
        bundle = build(
            cfg.dataset, tokenizer=self.tokenizer, seed=cfg.seed, cache_dir=cache_dir, _convert_="all"
        )
        check_method_data(self.method, bundle.kind, cfg.dataset)  # check_config's, for any builder
        check_prompts(bundle, cfg.dataset.max_length)  # what validate=true checks, before weights load
        return bundle

    # ---- method and arguments ---------------------------------------------------------------------
    @functools.cached_property
    def method(self) -> Method:
        """The training method (sft, dpo, orpo): the trainer backend and what it needs."""
        from fine_tune.training.methods import method_of

        return method_of(self.cfg.get("method"))

    def arguments(self, output_dir: str | Path, has_eval: bool) -> Any:
        """The method's TRL config from the `trainer` and `optim` nodes."""
        from fine_tune.families.shapes import model_shapes
        from fine_tune.utils.build import build

        cfg = self.cfg
        method = self.method.trl_arguments(
            max_length=cfg.dataset.max_length, starts_from_adapter=bool(cfg.get("init_adapter"))
        )
        return build(
            cfg.trainer,
            output_dir=str(output_dir),
            seed=cfg.seed,
            has_eval=has_eval,
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            method=method,
            decoder_layer=model_shapes(cfg.model, hub=False).family.decoder_layer,  # what FSDP shards by
            _convert_="all",
        )

    # ---- model and adapter ------------------------------------------------------------------------
    @functools.cached_property
    def base(self) -> Any:
        """The base model (+quant) through the run's `model` node: `LoadedModel(model, ..., quant)`."""
        from fine_tune.utils.build import build

        cfg = self.cfg
        # The quant node is instantiated by Hydra as a nested `_target_` (a dataclass passed in directly
        # would be turned back into a config).
        # FSDP with load_on_cpu: each rank loads into host RAM and FSDP moves its shards to the GPU.
        device = "cpu" if cfg.trainer.strategy == "fsdp" and cfg.trainer.fsdp.load_on_cpu else None
        return build(cfg.model, quant=cfg.quant, seed=cfg.seed, tokenizer=self.tokenizer, device=device)

    @functools.cached_property
    def model(self) -> Any:
        """The model to train: the base, prepared, with a fresh adapter or `init_adapter`'s."""
        from transformers import set_seed

        from fine_tune.adapters import attach_adapter, load_trained_adapter
        from fine_tune.models.quant import upcasts_frozen
        from fine_tune.plan import check_before_loading
        from fine_tune.utils.build import build

        cfg = self.cfg
        spec = build(cfg.lora)  # PEFT's own checks of the adapter config, before any weights load
        plan = check_before_loading(cfg)  # on a GPU: stop with advice before loading what will not fit
        if plan is not None:
            log.info("memory plan: %.1f GiB predicted peak", plan.total_bytes / 2**30)
        base, quant = self.base.model, self.base.quant
        upcast = upcasts_frozen(quant.kind, quant.upcast_frozen, cfg.trainer.strategy)
        # A KV cache in training makes packed rows attend across example boundaries (transformers 5.23
        # only honours restarting position_ids without a cache); training never needs it.
        base.config.use_cache = False
        checkpointing = cfg.trainer.gradient_checkpointing
        if cfg.get("init_adapter"):
            directory = init_adapter_dir(cfg.init_adapter)
            log.info("starting from the adapter in %s", directory)
            return load_trained_adapter(base, directory, checkpointing, upcast)
        set_seed(cfg.seed)  # adapter init must not depend on how many random numbers loading drew
        return attach_adapter(base, spec, checkpointing, upcast)

    def with_adapter(
        self,
        directory: str | Path,
        dequantize: bool = False,
        dtype: str | None = None,
        run_dir: str | Path | None = None,
    ) -> Any:
        """The base with a saved adapter (expert adapters included), in eval mode, for inference;
        `dequantize=True` turns a 4-bit base into plain float weights first (in `dtype`). A PiSSA/OLoRA
        checkpoint is loaded as plain LoRA, converted with its run's initial adapter (`run_dir`)."""
        from fine_tune.models.moe import dequantize_model, load_adapter
        from fine_tune.residual_init import plain_adapter_dir

        base = self.base.model
        if dequantize:
            base = dequantize_model(base, None if dtype in (None, "auto") else dtype)
        with plain_adapter_dir(Path(directory), Path(run_dir or Path(directory).parent)) as plain:
            model = load_adapter(base, plain)
        model.eval()
        return model

    # ---- trainer ----------------------------------------------------------------------------------
    def trainer(self, run_dir: Path, tracker: Any, preemption: Any) -> tuple[Any, Any]:
        """The method's trainer over `model` and `data`, with our callbacks; returns it and the metrics
        callback (final figures, resume of the loss record)."""
        from hydra.utils import get_class
        from transformers.trainer_callback import PrinterCallback

        from fine_tune.hardware import peak_flops, world_size
        from fine_tune.training.callbacks import MetricsLogCallback
        from fine_tune.training.methods import SFT_DATA
        from fine_tune.training.optim import build_optimizer_factory
        from fine_tune.training.samples import SampleCallback
        from fine_tune.training.throughput import PhaseTimer, model_flops_per_token

        cfg, data, model = self.cfg, self.data, self.model
        args = self.arguments(run_dir / "checkpoints", has_eval=data.eval is not None)
        timer = PhaseTimer()  # eval, samples and checkpoints: kept out of the training throughput
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        reference = self.method.reference and not getattr(args, "precompute_ref_log_probs", False)
        flops = model_flops_per_token(model, reference_forward=reference)
        peak = peak_flops(precision)
        metrics = MetricsLogCallback(
            run_dir,
            tracker,
            timer,
            flops_per_token=flops,
            peak_flops=peak and peak * world_size(),  # one GPU's peak; the tokens are every process's
            perplexity=self.method.data_kind == SFT_DATA,
        )
        generation = cfg.trainer.generation
        samples = SampleCallback(
            run_dir,
            tracker,
            self.tokenizer,
            data.prompts,
            generation.num_prompts,
            generation.max_new_tokens,
            cfg.trainer.eval_steps,
            timer=timer,
            decode=generation.decode,
        )
        trainer = get_class(self.method.trainer_class)(
            model=model,
            args=args,
            data_collator=data.collator,  # None for pairs: TRL's preference collators pad them
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=self.tokenizer,
            callbacks=[metrics, samples, preemption],
            optimizer_factory=build_optimizer_factory(cfg.optim.optimizer, cfg.optim.loraplus_lr_ratio),
            timer=timer,
        )
        trainer.remove_callback(PrinterCallback)  # our callback prints one concise line per step
        return trainer, metrics
