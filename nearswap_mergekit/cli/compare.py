"""`nearswap-mergekit compare` and `hash`: checkpoints tensor by tensor, and manifests."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from nearswap_mergekit.cli.common import BadInput, check_sample, require_mergekit


@contextlib.contextmanager
def _checkpoint_input():
    """Bad or unreadable input of `compare`/`hash` as one line and exit 2 (like cmp)."""
    from nearswap_mergekit.tools.checkpoints import InputError

    try:
        yield
    except InputError as error:
        raise BadInput(str(error)) from None
    except Exception as error:  # a truncated or corrupt shard, found while reading
        raise BadInput(f"cannot read the checkpoint: {type(error).__name__}: {error}") from None


@click.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--sample", default=1.0, show_default=True, type=float, metavar="F",
              callback=check_sample,
              help="Compare only a fraction F (0 < F <= 1) of each tensor's rows: the same "
              "rows on both sides, runs of contiguous rows drawn at random as `stats "
              "--sample` draws them. Fast on safetensors, but a difference outside the "
              "sample is not seen: a sample cannot prove identity (exit 0 then means that "
              "none was seen). Needs two checkpoints.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the row sample (--sample < 1); the same F and seed pick the same rows.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every tensor's result here (all differing tensors, not only the first 10).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compare_command(a, b, sample, seed, json_path, quiet):
    """Compare checkpoints A and B tensor by tensor. Exit status: 0 bit-identical,
    1 they differ, 2 bad input (as cmp and diff).

    A and B are each a model folder (safetensors, sharded or not, or
    pytorch_model.bin), a single .safetensors file, a Hub id (org/name[@revision])
    found in the local Hugging Face cache (else mergekit downloads it, unless
    HF_HUB_OFFLINE=1), or a manifest written by `nearswap-mergekit hash`.

    Per differing tensor: the fraction of elements that are bit-identical (a NaN
    equals a NaN with the same bits), the largest |difference| (float64), the
    largest distance in ULPs (-0.0 and +0.0 are 0 ULP apart though not
    identical), NaN mismatches, and the first differing index; tensors only one
    side has, and dtype or shape mismatches, are named. Against a manifest only
    bit-identity per tensor is known. One tensor per side is held at a time.

    \b
    nearswap-mergekit compare merged-cpu/ merged-cuda/
    nearswap-mergekit compare merged/ QuartetAnemoi-70B.manifest.json
    """
    require_mergekit("reads checkpoints with mergekit's own loader")
    from nearswap_mergekit.tools import checkpoints
    from nearswap_mergekit.tools import compare as comparing

    with _checkpoint_input():
        side_a, side_b = checkpoints.open_side(a), checkpoints.open_side(b)
        result = comparing.compare(side_a, side_b, sample, seed, progress=not quiet)
    click.echo(f"A: {side_a.describe()}")
    click.echo(f"B: {side_b.describe()}")
    if json_path:
        checkpoints.write_json(result.to_json(), json_path)
        click.echo(f"wrote {json_path}")
    for line in comparing.iter_report(result):
        click.echo(line)
    sys.exit(0 if result.identical else 1)


@click.command("hash")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The manifest to write (JSON).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def hash_command(model, output, quiet):
    """Write a manifest of MODEL: per tensor its dtype, shape and SHA-256.

    MODEL is a model folder, a single .safetensors file or a Hub id, as for
    `compare`. Each digest covers the tensor's dtype, shape and raw little-endian
    bytes in C order, so it does not depend on how the model is sharded or
    stored. Publish the manifest beside a model: anyone can then check a merge
    of their own against it with `nearswap-mergekit compare THEIR_MODEL/
    MANIFEST.json`, without downloading the model.
    """
    from nearswap_mergekit.tools import checkpoints

    folder = Path(output).resolve().parent
    if not folder.is_dir():
        raise BadInput(f"cannot write {output}: folder {folder} does not exist")
    with _checkpoint_input():
        checkpoint = checkpoints.open_checkpoint(model)
        manifest = checkpoints.hash_checkpoint(checkpoint, progress=not quiet)
    checkpoints.write_json(manifest, output)
    click.echo(f"wrote {output} ({len(manifest['tensors'])} tensors of {model})")
