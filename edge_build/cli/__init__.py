"""`edge-build` command line: a thin layer that parses options, calls stages, prints.

Subcommands live in their own modules and are imported only when used, so
`edge-build --help` and `edge-build doctor` do not pay for importing MindSpore.
"""

from __future__ import annotations

import importlib
import sys

import click

from edge_build.errors import EdgeBuildError

#: command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "doctor": ("edge_build.cli.doctor", "doctor", "Check a data set and report its defects."),
    "weights": ("edge_build.cli.weights", "weights", "Import pretrained backbone weights (TFLite -> MindSpore)."),
    "features": ("edge_build.cli.training", "features", "Extract and cache backbone features for every image."),
    "train": ("edge_build.cli.training", "train", "Train the 26-class head on cached features."),
    "eval": ("edge_build.cli.training", "evaluate", "Evaluate the trained network on the validation split."),
    "predict": ("edge_build.cli.training", "predict", "Classify images: class, bin and probability."),
    "export": ("edge_build.cli.export", "export", "Export the trained network to MindIR and ONNX."),
    "verify": ("edge_build.cli.export", "verify", "Check every exported artifact against the MindSpore network."),
    "targets": ("edge_build.cli.deploy", "targets", "List the target profiles."),
    "calibrate": ("edge_build.cli.deploy", "calibrate", "(Re)generate the calibration image list."),
    "quantize": ("edge_build.cli.deploy", "quantize", "Quantize the ONNX model to int8 with the calibration set."),
    "all": ("edge_build.cli.build", "build_all", "Run every stage a target needs and leave a bundle."),
    "check-bundle": ("edge_build.cli.build", "check_bundle", "Re-verify a bundle against its manifest."),
    "bench": ("edge_build.cli.bench", "bench", "Benchmark latency and accuracy per target; keep history."),
    "report": ("edge_build.cli.report", "report", "Write the one-page HTML/Markdown build report."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _not_yet(name)
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except EdgeBuildError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)


def _not_yet(name: str) -> click.Command:
    @click.command(name=name, help=f"{COMMANDS[name][2]} (not built yet)")
    def command() -> None:
        raise EdgeBuildError(f"`edge-build {name}` is not available in this version")

    return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-build")
def main() -> None:
    """edge-build: from an image data set to verified, benchmarked edge artifacts.

    The main job is `edge-build all --target lite`: doctor, weights import,
    features, train, export, quantize, verify and bench, leaving dist/lite/.
    """
