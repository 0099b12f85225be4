"""The ``normlab`` command line: trial | submit | resume | status | report | ui | validate.

Every command reads flat ``KEY=VALUE`` overrides with the same names a search-space
file and MLflow's params use. Bad input is reported (file, field, what is allowed) with
exit code 2 before any work starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import ValidationError
from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class UsageFailure(click.ClickException):
    """A user error: printed without a traceback, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        console.print(f"[bold red]error:[/] {self.message}", markup=True, soft_wrap=True)


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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageFailure(f"{path}: cannot read YAML: {exc}") from exc
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
        raise UsageFailure(str(exc)) from exc
    source = str(config_file) if config_file else "command line"
    try:
        return TrialConfig.model_validate(values)
    except ValidationError as exc:
        raise UsageFailure("invalid trial configuration\n" + format_validation_error(exc, source)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normlab")
def main() -> None:
    """normlab: adversarial robustness of normalization layers, as Ray Tune searches."""


@main.command(cls=KnobsCommand)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML file of trial knobs (overrides win).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result (config, per-epoch history, final metrics) as JSON.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), help="Save a checkpoint (last.pt) after every epoch here.")
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
    from orchestrator.report import final_table
    from trainables.checkpoints import load_checkpoint, save_checkpoint
    from trainables.trial import run_trial

    cfg = build_trial_config(config_file, overrides)
    if resume and not checkpoint_dir:
        raise UsageFailure("--resume needs --checkpoint-dir")
    checkpoint = None
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if resume and last and last.exists():
        checkpoint = load_checkpoint(last)
        console.print(f"resuming from {last} (epoch {checkpoint['epoch']})")

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if last:
            save_checkpoint(state, last)

    console.print(f"trial: {cfg.model} / {cfg.norm} / {cfg.regime} on {cfg.dataset}, {cfg.epochs} epochs")
    result = run_trial(cfg, on_epoch=on_epoch, checkpoint=checkpoint, progress=progress, log=lambda line: out.print(line, soft_wrap=True))
    out.print(final_table(result.final, cfg.eval_attacks, cfg.eval_eps, result.eval_batch_size))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        console.print(f"wrote {json_out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
