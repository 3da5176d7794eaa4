r"""Input-pipeline throughput on the host CPU, one JSON line per measurement (no GPU needed).

  # decoders alone: P processes, each decoding + cropping a shard set's records from memory
  python scripts/benchmark_input.py --shards=DIR --mode=decoders --decoders=simplejpeg,opencv \
      --processes=1,4,8,16 --sizes=224,128
  # a config's train input (here the whole ArrayRecord loader: Grain workers, batching, shared
  # memory), without a model: --config's dataset at each of --sizes with each of --processes
  # workers (its decoder and fast_dct as the config sets them)
  python scripts/benchmark_input.py --mode=loader --config=default \
      --config.dataset.name=array_record --config.dataset.path=DIR --processes=4,8,15 --sizes=224
  # the tf.data path (TFDS ImageFolder) on the same images: --folder=ROOT, per-core rate
  python scripts/benchmark_input.py --folder=ROOT --mode=tf_data --sizes=224
  # the peer: torchvision ImageFolder + DataLoader (timm's loader: PIL decode, RandomResizedCrop)
  python scripts/benchmark_input.py --folder=ROOT --mode=torch --processes=15 --sizes=224
  # on a GPU: nvImageCodec's backends decoding a shard set's JPEGs (whole or the crop window
  # only), then the GPU decode path's decoder with its resize (lambdanet/tools/gpu_decode_benchmark)
  python scripts/benchmark_input.py --shards=DIR --mode=gpu_decode --backends=hw,cuda,hybrid \
      --decode-batch-sizes=64,256 --sizes=224

img/s counts training crops (Inception crop, area 8-100%); a small shard set is read over and over
(its epochs repeat). The model's train step fed by the pipeline against on-device batches is
`scripts/benchmark.py --input-pipeline`.
"""

import itertools
import json
import multiprocessing
import os
import platform
import time
import types

import ml_collections
from absl import app, flags

from lambdanet import command_line, data
from lambdanet.data import array_record, crop, decode

_CONFIG = command_line.define_config_flag()
_MODE = flags.DEFINE_enum(
    "mode", None, ["decoders", "loader", "tf_data", "torch", "gpu_decode"], "What to time."
)
_SHARDS = flags.DEFINE_string("shards", None, "An ArrayRecord shard set (decoders, gpu_decode).")
_FOLDER = flags.DEFINE_string(
    "folder", None, "An image folder tree ROOT/<split>/<class>/ (tf_data, torch)."
)
_SPLIT = flags.DEFINE_string("split", "train", "The split read (decoders, tf_data, torch).")
_DECODERS = flags.DEFINE_list("decoders", ["simplejpeg"], f"Comma list of {decode.DECODERS}.")
_NO_FAST_DCT = flags.DEFINE_bool("no-fast-dct", False, "Decoders: the exact IDCT.")
_PROCESSES = flags.DEFINE_list("processes", ["1", "4", "8", "16"], "Processes or loader workers.")
_SIZES = flags.DEFINE_list("sizes", ["224", "128"], "Image sides.")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 256, "Batch size (loader, tf_data, torch).")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Seconds each measurement reads for.")
_BACKENDS = flags.DEFINE_list(
    "backends",
    ["hw", "cuda", "hybrid"],
    "gpu_decode: nvImageCodec backend sets, of lambdanet.tools.gpu_decode_benchmark.BACKENDS.",
)
_DECODE_BATCH_SIZES = flags.DEFINE_list("decode-batch-sizes", ["64", "256"], "gpu_decode.")
flags.mark_flag_as_required("mode")


def _records(shards: str, split: str) -> list[bytes]:
    manifest = array_record.read_manifest(shards)
    files, _ = array_record.split_files(shards, manifest, split)
    from array_record.python import array_record_data_source

    source = array_record_data_source.ArrayRecordDataSource(files)
    return [array_record.decode_record(source[i])[2] for i in range(len(source))]


def _decode_for(args):
    """One process: decode + crop records for `seconds`; returns the count."""
    shards, split, decoder_name, fast_dct, size, seconds, start_at, seed = args
    images = _records(shards, split)
    decoder = decode.Decoder(decoder_name, fast_dct)
    box_fn = crop.inception_box_fn([seed], (0.08, 1.0), (3 / 4, 4 / 3))
    while time.time() < start_at:
        time.sleep(0.001)
    # A process that started late (a loaded machine) still decodes for `seconds`.
    count, stop = 0, max(time.time(), start_at) + seconds
    while time.time() < stop:
        decoder.decode_crop(images[count % len(images)], box_fn, size)
        count += 1
    return count


def measure_decoders(args) -> None:
    for decoder_name in args.decoders:
        for size in map(int, args.sizes):
            for processes in map(int, args.processes):
                start_at = time.time() + 2.0 + 0.2 * processes  # all start together
                tasks = [
                    (
                        args.shards,
                        args.split,
                        decoder_name,
                        args.fast_dct,
                        size,
                        args.seconds,
                        start_at,
                        seed,
                    )
                    for seed in range(processes)
                ]
                with multiprocessing.get_context("spawn").Pool(processes) as pool:
                    counts = pool.map(_decode_for, tasks)
                rate = sum(counts) / args.seconds
                _emit(
                    dict(
                        kind="decoders",
                        decoder=decoder_name,
                        fast_dct=args.fast_dct,
                        size=size,
                        processes=processes,
                        img_per_s=rate,
                        img_per_s_per_process=rate / processes,
                    )
                )


def _steady_rate(batches, args, warmup_batches: int, buffered: int) -> tuple[float, float]:
    """(img/s, start-up seconds): `warmup_batches` taken (start-up), then the `buffered` batches
    the workers hold ready (they would inflate a short window), then batches for `seconds`."""
    start = time.perf_counter()
    for _ in range(warmup_batches):
        next(batches)
    startup = time.perf_counter() - start
    for _ in range(buffered):
        next(batches)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        steps += 1
        images = next(batches)
        images = images["image"] if isinstance(images, dict) else images[0]
        assert images.shape[0] == args.batch_size
    return steps * args.batch_size / (time.perf_counter() - start), startup


def _train_rate(
    args, warmup_batches: int, dataset: ml_collections.ConfigDict, seed: int = 0
) -> tuple[float, float]:
    """(img/s, start-up seconds) of a dataset config's train batches, without a model."""
    ds = data.create_dataset(
        dataset, global_batch_size=args.batch_size, eval_batch_size=args.batch_size, seed=seed
    )
    iterator = ds.train_iter(0)
    rate, startup = _steady_rate(
        iterator, args, warmup_batches, buffered=getattr(ds, "buffered_batches", 0)
    )
    if hasattr(iterator, "close"):
        iterator.close()
    return rate, startup


def measure_loader(args, config: ml_collections.ConfigDict) -> None:
    """`config`'s train input (its dataset, its train split read for eval too: no eval batch is
    read) at each of `args.sizes` with each of `args.processes` workers."""
    for size in map(int, args.sizes):
        for workers in map(int, args.processes):
            dataset = config.dataset.copy_and_resolve_references()
            dataset.update(eval_split=dataset.train_split, image_size=size, workers=workers)
            # start-up: a few batches from every worker
            rate, startup = _train_rate(args, max(2, workers * 3), dataset, config.data_seed)
            _emit(
                dict(
                    kind="loader",
                    dataset=dataset.name,
                    decoder=dataset.decoder,
                    fast_dct=dataset.fast_dct,
                    size=size,
                    workers=workers,
                    batch_size=args.batch_size,
                    img_per_s=rate,
                    startup_s=startup,
                )
            )


def measure_tf_data(args) -> None:
    cores = len(os.sched_getaffinity(0))
    for size in map(int, args.sizes):
        dataset = data.default_dataset_config()
        dataset.update(name="image_folder", path=args.folder, image_size=size, shuffle_buffer=512)
        dataset.update(train_split=args.split, eval_split=args.split)
        rate, _ = _train_rate(args, 3, dataset)
        _emit(
            dict(
                kind="tf_data",
                size=size,
                cores=cores,
                img_per_s=rate,
                img_per_s_per_core=rate / cores,
            )
        )


def measure_torch(args) -> None:
    """torchvision's ImageFolder in a DataLoader, as timm's and torchvision's ImageNet recipes
    read images: Pillow decode, RandomResizedCrop(size) and a horizontal flip in each worker,
    uint8 CHW tensors (normalisation would run on the GPU)."""
    import torch
    from torchvision import datasets, transforms

    for size in map(int, args.sizes):
        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )
        folder = datasets.ImageFolder(os.path.join(args.folder, args.split), transform=transform)
        # A small folder repeated, so that an epoch holds enough batches for every worker.
        repeats = -(-args.batch_size * 64 // len(folder))
        folder = torch.utils.data.ConcatDataset([folder] * repeats)
        for workers in map(int, args.processes):
            loader = torch.utils.data.DataLoader(
                folder,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                drop_last=True,
            )

            rate, startup = _steady_rate(
                itertools.chain.from_iterable(itertools.repeat(loader)),  # epoch after epoch
                args,
                max(2, workers * 2),
                buffered=2 * workers,  # prefetch_factor=2
            )
            _emit(
                dict(
                    kind="torch_dataloader",
                    size=size,
                    workers=workers,
                    batch_size=args.batch_size,
                    img_per_s=rate,
                    startup_s=startup,
                )
            )


def measure_gpu_decode(args) -> None:
    """nvImageCodec's backends (each batch size, whole images and crop windows), then the GPU
    decode path's decoder at each of `sizes`."""
    from lambdanet.tools import gpu_decode_benchmark

    images = _records(args.shards, args.split)
    for backends in args.backends:
        for size in map(int, args.sizes):
            _emit(gpu_decode_benchmark.accuracy(images, backends, size))
    for backends in args.backends:
        for batch_size in map(int, args.decode_batch_sizes):
            for region in (False, True):
                _emit(
                    gpu_decode_benchmark.decoder_rates(
                        images, backends, batch_size, region, args.seconds
                    )
                )
    for size in map(int, args.sizes):
        for batch_size in map(int, args.decode_batch_sizes):
            _emit(gpu_decode_benchmark.pipeline_rates(images, batch_size, size, args.seconds))


def _emit(record: dict) -> None:
    record |= dict(host=platform.node(), cpus=os.cpu_count(), python=platform.python_version())
    print(json.dumps(record), flush=True)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    mode, folder_mode = _MODE.value, _MODE.value in ("tf_data", "torch")
    given = dict(folder=bool(_FOLDER.value), shards=bool(_SHARDS.value), config=bool(_CONFIG.value))
    shards_mode = mode in ("decoders", "gpu_decode")
    takes = dict(folder=folder_mode, shards=shards_mode, config=mode == "loader")
    if given != takes:
        raise app.UsageError(
            "--mode=tf_data and --mode=torch take --folder, --mode=decoders/gpu_decode --shards, "
            "--mode=loader --config (e.g. --config=default --config.dataset.name=array_record "
            "--config.dataset.path=DIR)."
        )
    args = types.SimpleNamespace(
        shards=_SHARDS.value,
        folder=_FOLDER.value,
        split=_SPLIT.value,
        decoders=_DECODERS.value,
        fast_dct=not _NO_FAST_DCT.value,
        processes=_PROCESSES.value,
        sizes=_SIZES.value,
        batch_size=_BATCH_SIZE.value,
        seconds=_SECONDS.value,
        backends=_BACKENDS.value,
        decode_batch_sizes=_DECODE_BATCH_SIZES.value,
    )
    if mode == "loader":
        measure_loader(args, _CONFIG.value)
        return
    measure = dict(
        decoders=measure_decoders,
        tf_data=measure_tf_data,
        torch=measure_torch,
        gpu_decode=measure_gpu_decode,
    )
    measure[mode](args)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
