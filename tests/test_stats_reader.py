"""How `stats` reads safetensors rows: a sample asks the files for its own rows'
bytes (by offset, not through the mapping, whose readahead would fetch most of
a cold checkpoint), a whole pass reads large tensors through the mapping."""

import os

import pytest
import torch
import yaml
from conftest import mergekit_independent
from safetensors.torch import load_file, save_file

from nearswap_mergekit.plan import measuring, planning, reader, sampling
from nearswap_mergekit.plan.recipe import Plan
from nearswap_mergekit.tiny import TinyLlama, build_family

#: MLP tensors of 8192 rows of 256 (or 256 of 8192): a 3 % sample reads a few
#: pages here and there of each, well apart.
SPEC = TinyLlama(hidden_size=256, intermediate_size=8192, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, dtype=torch.float16)
SAMPLE = 0.03
PAGE = 4096


def plan_family(root):
    """A base and a secondary of SPEC's shapes, and the jobs of a chain of the two."""
    paths = build_family(root / "models", ["miqu", "xwin"], SPEC)
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "nearswap_chain",
        "base_model": str(paths["miqu"]),
        "models": [{"model": str(paths["xwin"])}],
        "parameters": {"t": 1e-4},
        "dtype": "float16",
    }))
    files = [paths[name] / "model.safetensors" for name in ("miqu", "xwin")]
    return Plan(str(recipe)).jobs, files


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return plan_family(tmp_path_factory.mktemp("reader"))


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """Files of their own: pages mapped by a whole pass over the others (the tensor
    views live as long as the plan) cannot be evicted."""
    return plan_family(tmp_path_factory.mktemp("cold"))


def sampled_runs(jobs, sample, seed=0):
    """(path, first byte, byte count) of every run of rows a sample reads, all models."""
    runs = []
    for job in jobs:
        base = job.readers[job.base_model]
        drawn = sampling.sample_rows(job.name, base.rows, base.row_len, sample, seed)
        for model in [base, *(job.readers[s.model] for s in job.stages)]:
            for cluster in drawn.chosen:
                first = cluster * drawn.cluster_rows
                count = min(drawn.cluster_rows, drawn.rows - first)
                runs.append((model.path, model.span.start + first * model.row_bytes,
                             count * model.row_bytes))
    return runs


def measure(jobs, sample):
    return measuring.measure(jobs, [planning.recipe_t], sample, progress=False)


def test_a_sample_asks_the_files_for_its_rows_bytes_and_no_more(planned):
    jobs, files = planned
    total = sum(os.path.getsize(f) for f in files)
    expected = sum(length for _, _, length in sampled_runs(jobs, SAMPLE))
    assert expected < total / 10  # a sample, not the files
    before = reader.ReadCount.bytes_read
    measure(jobs, SAMPLE)
    assert reader.ReadCount.bytes_read - before == expected


def test_a_whole_pass_reads_large_tensors_through_the_mapping(planned):
    """Sequential readahead serves a whole pass best: the MLP tensors (a few MB each)
    are views of the mapped file; only tensors smaller than a block are read by offset."""
    jobs, files = planned
    mlp = sum(r.rows * r.row_bytes for job in jobs if ".mlp." in job.name
              for r in job.readers.values())
    others = sum(r.rows * r.row_bytes for job in jobs if ".mlp." not in job.name
                 for r in job.readers.values())
    before = reader.ReadCount.bytes_read
    measure(jobs, 1.0)
    assert 0 < reader.ReadCount.bytes_read - before <= others < mlp


def _read_bytes() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("read_bytes"))


def _evict(files) -> None:
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # dirty pages are not evicted
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def test_a_sample_of_a_cold_file_reads_about_its_own_size_from_the_device(planned, cold):
    """From a cold page cache, the device reads the sample's pages, not the mapping's
    readahead windows around them (which would be most of the files)."""
    jobs, files = cold
    if not os.path.exists("/proc/self/io") or not hasattr(os, "posix_fadvise"):
        pytest.skip("needs Linux's per-process I/O counters")
    _evict(files)
    start = _read_bytes()
    with open(files[0], "rb") as file:
        file.seek(os.path.getsize(files[0]) // 2)
        file.read(1 << 16)
    if _read_bytes() - start < 1 << 16:
        pytest.skip("this filesystem does not count reads from its device (tmpfs, overlay)")
    measure(planned[0], SAMPLE)  # the kernel and the read threads, started
    pages = PAGE * len({(path, page) for path, offset, length in sampled_runs(jobs, SAMPLE)
                        for page in range(offset // PAGE, (offset + length - 1) // PAGE + 1)})
    total = sum(os.path.getsize(f) for f in files)
    assert pages < total / 5  # a sample, not the files
    _evict(files)
    start = _read_bytes()
    measure(jobs, SAMPLE)
    read = _read_bytes() - start
    print(f"read {read} B from the device for a sample of {pages} B of pages; files {total} B")
    assert pages <= read <= 1.5 * pages + 16 * PAGE


@mergekit_independent
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_read_rows_gives_the_rows_asked_for(tmp_path, dtype):
    """Runs of rows, single rows, rows out of order, the last row; converted where
    the target's dtype differs from the file's."""
    tensor = torch.randn(300, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    path = tmp_path / "rows.safetensors"
    save_file({"before": torch.zeros(3), "rows": tensor}, str(path))
    rows = reader.SafetensorsRows(str(path), "rows")
    assert (rows.shape, rows.dtype, rows.rows, rows.row_len) == ((300, 7), torch.bfloat16, 300, 7)
    index = torch.tensor([5, 6, 7, 8, 40, 2, 3, 299, 100, 101])
    out = torch.empty(len(index), 7, dtype=dtype)
    rows.read_rows(index, out)
    assert torch.equal(out, load_file(str(path))["rows"][index].to(dtype))


@mergekit_independent
def test_a_truncated_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"rows": torch.ones(100, 10)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="cut.safetensors is truncated"):
        reader.SafetensorsRows(str(path), "rows")
