"""``normlab trial``: one trial in this process, no Ray, no MLflow (its knobs from a YAML file and
``KEY=VALUE`` overrides)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from orchestrator.cli.common import TrialFailure, UsageFailure, console, main, out, overrides_argument


class KnobsCommand(click.Command):
    """A command whose help ends with every TrialConfig knob and its default (built lazily)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from trainables.config import TrialConfig

        rows = []
        for name, field in TrialConfig.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, list):
                default = ",".join(str(v) for v in default) or "[]"
            rows.append((f"{name}={default}", field.description or ""))
        with formatter.section("Trial knobs (KEY=VALUE, shown with their defaults)"):
            formatter.write_dl(rows)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A ``--config`` file, read with the bounded YAML reader; any refusal is a UsageFailure."""
    from trainables.safe_yaml import YamlRefused, load_yaml_file

    try:
        data = load_yaml_file(path)
    except YamlRefused as exc:
        raise UsageFailure(f"cannot read trial configuration\n{exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UsageFailure(f"{path}: expected a mapping of trial knobs, got {type(data).__name__}")
    return data


def build_trial_config(config_file: Path | None, overrides: tuple[str, ...]) -> Any:
    """TrialConfig from an optional YAML file plus ``KEY=VALUE`` overrides, or a UsageFailure."""
    from trainables.config import TrialConfig, format_validation_error, parse_overrides

    values: dict[str, Any] = _read_yaml_mapping(config_file) if config_file else {}
    try:
        values.update(parse_overrides(list(overrides)))
    except ValueError as exc:
        raise UsageFailure(f"invalid trial configuration\ncommand line: {exc}") from exc
    source = str(config_file) if config_file else "command line"
    try:
        return TrialConfig.model_validate(values)
    except ValidationError as exc:
        raise UsageFailure("invalid trial configuration\n" + format_validation_error(exc, source)) from exc


def _check_writable_folder(folder: Path, what: str) -> None:
    """Make ``folder`` and write and remove a file in it, or a UsageFailure naming ``what`` (the
    option and its value): a folder that cannot be written (a file in the way, no permission, a
    read-only disk) is refused before any work starts, not after the first epoch."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".normlab-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, FileExistsError):
            reason = "a file is in the way"
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageFailure(f"{what}: cannot write in the folder {folder} ({reason})") from exc


@main.command(cls=KnobsCommand)
@overrides_argument
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of trial knobs (overrides win).",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result (config, per-epoch history, final metrics) as JSON.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save a checkpoint (last.pt) after every epoch here.",
)
@click.option("--resume/--no-resume", default=False, help="Continue from --checkpoint-dir/last.pt if it exists.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per epoch.")
def trial(
    overrides: tuple[str, ...],
    config_file: Path | None,
    json_out: Path | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool,
) -> None:
    """Run one trial locally: no Ray, no MLflow.

    \b
    Example:
      normlab trial dataset=digits model=cnn norm=robustnorm norm_power=0.2 \\
                    regime=pgd_at epochs=10 eval_attacks=fgsm,pgd eval_eps=0.05,0.1 \\
                    --json-out result.json
    """
    from orchestrator.display.views import final_table, shift_table
    from trainables.checkpoints import load_checkpoint, save_checkpoint
    from trainables.trial import check_checkpoint, run_trial

    cfg = build_trial_config(config_file, overrides)
    if resume and not checkpoint_dir:
        raise UsageFailure("--resume needs --checkpoint-dir")
    if checkpoint_dir:
        _check_writable_folder(checkpoint_dir, f"--checkpoint-dir {checkpoint_dir}")
    if json_out:
        _check_writable_folder(json_out.parent, f"--json-out {json_out}")
    checkpoint = None
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if resume and last and last.exists():
        try:
            checkpoint = load_checkpoint(last)
            check_checkpoint(cfg, checkpoint, str(last))
        except (OSError, ValueError) as exc:
            raise UsageFailure(f"cannot resume\n{exc}") from exc
        console.print(f"resuming from {last} (epoch {checkpoint['epoch']})")

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if last:
            save_checkpoint(state, last)

    console.print(f"trial: {cfg.model} / {cfg.norm} / {cfg.regime} on {cfg.dataset}, {cfg.epochs} epochs")
    try:
        result = run_trial(
            cfg,
            on_epoch=on_epoch,
            checkpoint=checkpoint,
            progress=progress,
            log=lambda line: out.print(line, soft_wrap=True),
        )
    except (FloatingPointError, OSError, ValueError, RuntimeError) as exc:
        saved = f" (last good checkpoint: {last})" if last and last.exists() else ""
        raise TrialFailure(f"{type(exc).__name__}: {exc}{saved}") from exc
    out.print(final_table(result.final, cfg.eval_attacks, cfg.eval_eps, result.eval_batch_size))
    shifts = shift_table(result.final, cfg.primary_attack, cfg.primary_eps)  # None unless shift_diagnostic=true
    if shifts is not None:
        out.print(shifts)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"wrote {json_out}")
