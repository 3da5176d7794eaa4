r"""Summarises training runs: a Markdown table and a PNG of validation top-1 against epochs.

    python scripts/summarize_runs.py --runs=resnet50=workdir/r50,hybrid=workdir/hybrid \
        --png=results/imagenette_curves.png --title="Imagenette, 128 px"

Table columns (`lambdanet.tools.summarize`): model, parameters, epochs, training img/s (median
over the logged windows, evaluation windows included), final validation top-1 and the eval-only
top-1.
"""

from collections.abc import Sequence

from absl import app, flags

from lambdanet.tools import summarize

_RUNS = flags.DEFINE_list("runs", None, "NAME=WORKDIR pairs (or WORKDIRs).", required=True)
_PNG = flags.DEFINE_string("png", None, "Where to write the validation-accuracy curves.")
_TITLE = flags.DEFINE_string("title", "", "Title of the plot.")


def main(argv: Sequence[str]) -> None:
    del argv
    pairs = [run.partition("=") for run in _RUNS.value]
    runs = [summarize.summarize(name, path or name) for name, _, path in pairs]
    print(summarize.markdown_table(runs))
    if _PNG.value:
        summarize.plot_curves(runs, _PNG.value, _TITLE.value)
        print(f"Wrote {_PNG.value}")


if __name__ == "__main__":
    app.run(main)
