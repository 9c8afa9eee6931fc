"""`vggjax COMMAND ...`: one installed command whose subcommands are the tools."""
from __future__ import annotations

import functools
import importlib
import sys
from typing import NoReturn

import vggjax
from vggjax.utils import interrupts

# subcommand -> (module, what it does, what "error: interrupted; ..." adds). Modules load only
# when their command runs, after Ctrl-C is handled (`run`), so the message lives here.
COMMANDS = {
    "convert": ("vggjax.cli.convert", "Keras / torchvision / timm weights, or a model trained with them, "
                "for vggjax", "nothing was written"),
    "predict": ("vggjax.cli.predict", "classify image files (top-k ImageNet classes, or a fine-tuned "
                "classifier)", "the files written so far are complete"),
    "export": ("vggjax.cli.export", "an artifact that runs without vggjax: StableHLO, SavedModel or ONNX",
               "nothing was written"),
    "finetune": ("vggjax.cli.finetune", "the book's transfer learning on an image folder: feature "
                 "extraction, frozen base, block5 fine-tuning", "run the same command again to resume"),
}
USAGE = "usage: vggjax {convert,predict,export,finetune} ... [-h]"


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: `vggjax convert --source keras --arch vgg16`, `vggjax predict --help`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"vggjax {vggjax.__version__}")
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        lines = [USAGE, "", "commands:"] + [f"  {name:<9} {what}" for name, (_, what, _) in COMMANDS.items()]
        lines += ["", "`vggjax COMMAND --help` lists a command's options; --version prints vggjax's."]
        wrong = argv and argv[0] not in ("-h", "--help")
        print("\n".join(lines + ([f"\nvggjax: error: unknown command {argv[0]!r}"] if wrong else [])),
              file=sys.stderr if wrong else sys.stdout)
        sys.exit(2 if wrong else 0)
    run(argv[0], argv[1:], prog=f"vggjax {argv[0]}")


def run(name: str, argv: list[str], prog: str | None = None) -> NoReturn:
    """Run subcommand `name` with `argv` and exit with its status: Ctrl-C or SIGTERM at any instant,
    its imports included, ends in one line (`interrupts.command`, `interrupts.run_command`)."""
    module_name, _, interrupted = COMMANDS[name]
    interrupts.command(interrupted)
    module = importlib.import_module(module_name)
    interrupts.run_command(functools.partial(module.main, argv, prog=prog), interrupted)
