"""The `captioner` command. Imports stay inside each command so that `captioner --help` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from captioner import __version__


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from captioner.errors import CaptionerError

    if args.traceback or os.environ.get("CAPTIONER_DEBUG", "") not in ("", "0"):
        return int(args.run(args) or 0)  # every error with its traceback
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # e.g. `captioner caption dir/ | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CaptionerError, OSError) as e:
        # Our errors name the file or setting and what is wrong; OSErrors (a missing file, a full disk, a
        # permission) are the machine's. Either way the user can act on one line; a traceback would bury it.
        print(f"captioner: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional part of the package whose dependencies are not installed
        print(
            f"captioner: error: {e} (a dependency of this command is missing: `make install`)",
            file=sys.stderr,
        )
        return 1
    # Anything else is a bug in captioner: Python prints its traceback, which is what a report needs.


class _Help(argparse.HelpFormatter):
    """--help shows every option's default (argparse's own defaults formatter skips options without help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = (
            action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS
        )
        shown = action.option_strings and not unset
        if shown and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def _number(
    kind: type = int, *, low: float | None = None, above: float | None = None, high: float | None = None
):
    """An argparse type: a finite `kind` within the bounds, else a one-line error naming the option."""
    from captioner.limits import Limit

    limit = Limit(low=low, above=above, high=high)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not limit.allows(value):
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in "invalid int value"
    return parse


POSITIVE, COUNT, NUMBER = _number(int, low=1), _number(int, low=0), _number(float)


def _bundled() -> str:
    """The bundled models' names, without importing torch (for --help)."""
    root = Path(__file__).parent / "bundled"
    return ", ".join(sorted(p.name for p in root.iterdir() if (p / "config.json").exists())) or "none"


def _decoding_switches(parser: argparse.ArgumentParser) -> None:
    """The switches that take decoding back to the decoder alone, shared by `caption` and `evaluate`."""
    parser.add_argument(
        "--no-grounding",
        action="store_false",
        dest="grounding",
        help="decode without the visual labels (captioner.grounding): the decoder alone",
    )
    parser.add_argument(
        "--no-rerank",
        action="store_false",
        dest="rerank",
        help="keep the beam's own order, not re-ranked by the model's training neighbours' captions "
        "(captioner.neighbours)",
    )
    parser.add_argument(
        "--allow-mid-phrase-end",
        action="store_false",
        dest="whole_phrases",
        help='let a caption end mid-phrase ("playing in the"); by default <end> waits for the noun',
    )


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"a checkpoint directory, a `captioner export` directory or a bundled model ({_bundled()}; "
        "default: flickr8k); give it twice or more for an ensemble",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioner", description="Image captioning: caption, train, evaluate.")
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    p.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback of any error (also: CAPTIONER_DEBUG=1)",
    )
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    c = sub.add_parser("caption", help="caption images (files or folders)")
    c.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    _model_option(c)
    c.add_argument("--beam-size", type=POSITIVE, default=3, help="beams of the search (1: greedy)")
    c.add_argument(
        "--n-best",
        type=POSITIVE,
        default=1,
        help="captions an image, best first (with --temperature: samples)",
    )
    c.add_argument(
        "--length-penalty", type=NUMBER, default=None, help="GNMT alpha (default: the model's own)"
    )
    c.add_argument("--no-repeat-ngram", type=COUNT, default=None, help="block repeated n-grams (beam search)")
    c.add_argument(
        "--temperature", type=_number(float, above=0), default=None, help="sample instead of searching"
    )
    c.add_argument(
        "--top-p",
        type=_number(float, above=0, high=1),
        default=None,
        help="nucleus sampling (with --temperature)",
    )
    _decoding_switches(c)
    c.add_argument("--batch-size", type=POSITIVE, default=16, help="images a pass")
    c.add_argument(
        "--format",
        choices=["text", "jsonl"],
        default="text",
        help="jsonl: one JSON record an image, with score and labels",
    )
    c.add_argument(
        "--out",
        default=None,
        help="write JSON lines to this file instead: resumable (a re-run captions only what is missing) "
        "and needed under torchrun, whose processes share the images",
    )
    c.add_argument(
        "--runtime",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="auto: onnxruntime for a `captioner export` directory, else PyTorch",
    )
    c.add_argument("--device", default="auto", help="torch runtime: auto (the GPU if any), cpu, cuda, cuda:N")
    c.set_defaults(run=_caption)

    x = sub.add_parser("export", help="export a model for another runtime")
    x.add_argument("--format", choices=["onnx"], default="onnx")
    x.add_argument(
        "--model",
        default=None,
        help=f"checkpoint directory or bundled model ({_bundled()}; default: flickr8k)",
    )
    x.add_argument("--out", required=True, help="directory to write (graphs, config, vocabulary)")
    x.set_defaults(run=_export)

    d = sub.add_parser("data", help="data set tools")
    dsub = d.add_subparsers(title="data commands", metavar="COMMAND")
    di = dsub.add_parser("inspect", help="detect a data set's layout and print what it holds")
    di.add_argument("root")
    di.add_argument("--skip-missing", action="store_true", help="skip images listed but missing on disk")
    di.add_argument("--json", action="store_true", help="print the summary as JSON")
    di.set_defaults(run=_data_inspect)
    ds = dsub.add_parser("split", help="save a data set's splits to a file, so they stay as they are")
    ds.add_argument("root")
    ds.add_argument("--out", default=None, help="default: captioner_split.json beside the data")
    ds.add_argument("--seed", type=COUNT, default=0, help="of the seeded split, for layouts without one")
    ds.add_argument("--skip-missing", action="store_true")
    ds.set_defaults(run=_data_split)

    e = sub.add_parser("extract-features", help="cache encoder features of a data set's images")
    e.add_argument("root", help="data set directory")
    e.add_argument("--encoder", default="efficientnet_lite2")
    e.add_argument("--out", required=True, help="feature cache directory")
    e.add_argument("--resize", choices=["squash", "crop"], default=None, help="override the resize mode")
    e.add_argument("--batch-size", type=POSITIVE, default=32)
    e.add_argument("--workers", type=COUNT, default=1, help="loader processes")
    e.add_argument("--skip-missing", action="store_true")
    e.set_defaults(run=_extract)

    t = sub.add_parser("train", help="train a captioning model")
    t.add_argument("--config", required=True, help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 decoder.name=merge")
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in the output dir"
    )
    t.set_defaults(run=_train)

    v = sub.add_parser("evaluate", help="score a model on a data set split with the coco-caption metrics")
    v.add_argument("root")
    v.add_argument("--split", default="test")
    _model_option(v)
    v.add_argument("--beam-size", type=POSITIVE, nargs="+", default=[3], help="one or more, e.g. 1 3 5")
    v.add_argument(
        "--length-penalty", type=NUMBER, default=None, help="GNMT alpha (default: the model's own)"
    )
    v.add_argument("--no-repeat-ngram", type=COUNT, default=None, help="block repeated n-grams (beam search)")
    _decoding_switches(v)
    v.add_argument("--batch-size", type=POSITIVE, default=32)
    v.add_argument("--limit", type=POSITIVE, default=None, help="only the first N images of the split")
    v.add_argument("--features", default=None, help="feature cache of the model's encoder (faster)")
    v.add_argument(
        "--output",
        default=None,
        help="JSON file for the scores and every caption (default: eval-MODEL-SPLIT.json)",
    )
    v.add_argument("--skip-missing", action="store_true")
    v.add_argument(
        "--split-file", default=None, help="splits saved by training (OUT/split.json) or `data split`"
    )
    v.add_argument(
        "--resize", choices=["squash", "crop"], default=None, help="override how photos are made square"
    )
    v.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    v.set_defaults(run=_evaluate)

    nb = sub.add_parser(
        "neighbours",
        help="give a checkpoint its training photos, to re-rank the beam by their captions",
        description="Encode a data set split's photos with the model's encoder and write their keys and "
        "PTB-tokenized captions into the checkpoint (neighbours.safetensors): beam search then keeps the "
        "candidate that the nearest photos' captions agree with (captioner.neighbours).",
    )
    nb.add_argument("root", help="data set directory (the one the model was trained on)")
    nb.add_argument(
        "--model", required=True, help="checkpoint directory to write neighbours.safetensors into"
    )
    nb.add_argument("--split", default="train")
    nb.add_argument("--dim", type=POSITIVE, default=128, help="principal components kept of the features")
    nb.add_argument("--k", type=POSITIVE, default=10, help="nearest photos a caption is compared with")
    nb.add_argument("--weight", type=_number(float, low=0), default=4.0, help="of consensus in the ranking")
    nb.add_argument("--features", default=None, help="feature cache of the model's encoder (faster)")
    nb.add_argument("--batch-size", type=POSITIVE, default=32)
    nb.add_argument("--skip-missing", action="store_true")
    nb.set_defaults(run=_neighbours)

    r = sub.add_parser(
        "evaluate-search", help="recall@1/5/10 of the search embedding on a split (the standard protocol)"
    )
    r.add_argument("root")
    r.add_argument("--split", default="test")
    r.add_argument(
        "--embedding",
        required=True,
        help="a search embedding's checkpoint folder (captioner train, task search)",
    )
    r.add_argument("--features", default=None, help="feature cache of the embedding's encoder (faster)")
    r.add_argument(
        "--queries", type=POSITIVE, default=None, help="each photo's first N captions (default: all)"
    )
    r.add_argument("--limit", type=POSITIVE, default=None, help="only the first N photos of the split")
    r.add_argument("--output", default=None, help="JSON file for the scores")
    r.add_argument("--skip-missing", action="store_true")
    r.set_defaults(run=_evaluate_search)

    i = sub.add_parser("index", help="caption every photo under a folder into a searchable SQLite database")
    i.add_argument("folder")
    i.add_argument("--db", default="photos.sqlite")
    i.add_argument("--model", default=None, help="default: flickr8k-xe, the better model for search")
    i.add_argument("--beam-size", type=POSITIVE, default=3)
    i.add_argument("--n-best", type=POSITIVE, default=3, help="captions kept a photo, for search")
    i.add_argument("--batch-size", type=POSITIVE, default=16)
    i.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    i.add_argument(
        "--embedding",
        default=None,
        help="search embedding to embed the photos with: a folder, a bundled name, or none (default: "
        "flickr8k-search when it reads the model's encoder; a re-index keeps the index's own)",
    )
    i.add_argument(
        "--keep-grid",
        action="store_true",
        help="store each photo's encoder grid (205 KB a photo, not about 10 KB), so that search --rerank "
        "and a new --embedding need not read the photos again",
    )
    i.set_defaults(run=_index)

    q = sub.add_parser("search", help="find indexed photos by describing them in a sentence")
    q.add_argument(
        "query",
        nargs="*",
        help="what the photo shows, in words; several queries search in one start-up, and - reads one "
        "query per line from standard input",
    )
    q.add_argument("--image", default=None, help="instead of a query: find the photos most like this one")
    q.add_argument("--db", default="photos.sqlite")
    q.add_argument("--top", type=POSITIVE, default=5, help="results a query")
    q.add_argument(
        "--model", default=None, help="the model that made the index (default: the one it records)"
    )
    q.add_argument(
        "--rerank",
        action="store_true",
        help="re-rank the best 100 by P(query | photo) with the index's model (slower; see the README)",
    )
    q.add_argument("--format", choices=["text", "jsonl"], default="text")
    q.set_defaults(run=_search)

    w = sub.add_parser("serve", help="the captioning web page and JSON API")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=_number(int, low=0, high=65535), default=8000, help="0: any free port")
    _model_option(w)
    w.add_argument("--db", default=None, help="a photo index (from `captioner index`) to search on the page")
    w.add_argument("--max-upload-mb", type=_number(float, above=0), default=20.0)
    w.add_argument("--max-batch", type=POSITIVE, default=16, help="most requests captioned in one pass")
    w.add_argument(
        "--max-wait-ms", type=_number(float, low=0), default=10.0, help="how long a request waits for others"
    )
    w.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    w.set_defaults(run=_serve)
    _with_help(p)
    return p


def _with_help(parser: argparse.ArgumentParser) -> None:
    """Every command's --help shows the defaults."""
    parser.formatter_class = _Help
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_help(sub)


def _export(args: argparse.Namespace) -> int:
    from captioner.model import Captioner
    from captioner.onnx import export_onnx

    out = export_onnx(Captioner.from_pretrained(args.model, runtime="torch"), args.out)
    print(f"exported {args.format} model to {out}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from captioner.search import index_command

    return index_command(args)


def _search(args: argparse.Namespace) -> int:
    from captioner.search import search_command

    if bool(args.query) == (args.image is not None):
        raise SystemExit("captioner search: give a query or --image PHOTO (one of them)")
    return search_command(args)


def _serve(args: argparse.Namespace) -> int:
    from captioner.server import serve_command

    return serve_command(args)


def _data_inspect(args: argparse.Namespace) -> int:
    from captioner.data import format_summary, load_dataset

    summary = load_dataset(args.root, skip_missing=args.skip_missing).summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _data_split(args: argparse.Namespace) -> int:
    from captioner.data import default_split_file, load_dataset, save_split

    data = load_dataset(args.root, skip_missing=args.skip_missing, seed=args.seed)
    out = save_split(data, args.out or default_split_file(data.root))
    counts = ", ".join(f"{len(data.split(s)):,} {s}" for s in ("train", "val", "test"))
    print(f"{out}: {counts} ({data.split_source})")
    return 0


def _extract(args: argparse.Namespace) -> int:
    import time

    from captioner import distributed
    from captioner.data import load_dataset
    from captioner.encoders import create_encoder
    from captioner.features import DONE, FAILED, FeatureStore, extract_features, image_key, open_cache

    ddp = distributed.setup()  # under torchrun each process encodes its own share of the images
    data = load_dataset(args.root, skip_missing=args.skip_missing)
    encoder = create_encoder(args.encoder, resize=args.resize)
    paths = [ex.image for ex in data.examples]
    keys = [image_key(p, data.root) for p in paths]
    if ddp.main:
        open_cache(Path(args.out), keys, encoder, create=True)
    distributed.barrier(ddp)
    start = time.perf_counter()
    result = extract_features(
        paths,
        keys,
        encoder,
        args.out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=ddp.main,
        rank=ddp.rank,
        world_size=ddp.world,
    )
    seconds = time.perf_counter() - start
    for message in result["errors"]:
        print(f"error: {message}", file=sys.stderr)
    distributed.barrier(ddp)
    if ddp.main:
        done = FeatureStore.open(args.out).done
        encoded, failed = int((done == DONE).sum()), int((done == FAILED).sum())
        print(
            f"{encoded:,} of {len(keys):,} images encoded ({failed} failed) into {args.out}; "
            f"grid {result['grid_shape']}; this run {seconds:.0f} s"
        )
    distributed.cleanup(ddp)
    return 1 if result["errors"] else 0


def _train(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.training import train

    config = load_config(args.config, args.overrides)
    if config.train.task == "search":  # the search embedding, not a captioner
        from captioner.search.train_joint import train_joint

        train_joint(config, resume=args.resume)
        return 0
    if config.train.task != "caption":
        from captioner.errors import ConfigError

        raise ConfigError(f"train.task: {config.train.task!r} is not caption or search")
    train(config, resume=args.resume)
    return 0


def _caption(args: argparse.Namespace) -> int:
    from captioner.generation import GenerationOptions
    from captioner.inference import caption_paths

    options = GenerationOptions(
        beam_size=args.beam_size,
        n_best=args.n_best,
        length_penalty=args.length_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
        temperature=args.temperature,
        top_p=args.top_p,
        grounding=args.grounding,
        whole_phrases=args.whole_phrases,
        rerank=args.rerank,
    )
    return caption_paths(
        args.paths,
        model=args.model,
        options=options,
        batch_size=args.batch_size,
        fmt=args.format,
        runtime=args.runtime,
        device=args.device,
        out=args.out,
    )


def _evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluate import default_output, evaluate_model
    from captioner.generation import GenerationOptions

    evaluate_model(
        args.root,
        split=args.split,
        model=args.model,
        beam_sizes=args.beam_size,
        options=GenerationOptions(
            length_penalty=args.length_penalty,
            no_repeat_ngram=args.no_repeat_ngram,
            grounding=args.grounding,
            whole_phrases=args.whole_phrases,
            rerank=args.rerank,
        ),
        batch_size=args.batch_size,
        limit=args.limit,
        features=args.features,
        resize=args.resize,
        output=Path(args.output) if args.output else default_output(args.model, args.split),
        skip_missing=args.skip_missing,
        split_file=args.split_file,
        device=args.device,
    )
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    from captioner.model import Captioner
    from captioner.neighbours import from_dataset

    model = Captioner.from_pretrained(args.model, runtime="torch")
    assert model.path is not None
    neighbours = from_dataset(
        model,
        args.root,
        split=args.split,
        dim=args.dim,
        k=args.k,
        weight=args.weight,
        features=args.features,
        batch_size=args.batch_size,
        skip_missing=args.skip_missing,
    )
    file = neighbours.save(model.path)
    print(
        f"wrote {file} ({file.stat().st_size / 2**20:.1f} MB): {neighbours.source}, "
        f"{neighbours.keys.shape[1]} components, k {neighbours.k}, weight {neighbours.weight:g}"
    )
    return 0


def _evaluate_search(args: argparse.Namespace) -> int:
    from captioner.search.evaluate import evaluate_search

    evaluate_search(
        args.root,
        args.embedding,
        args.split,
        features=args.features,
        queries=args.queries,
        limit=args.limit,
        output=Path(args.output) if args.output else None,
        skip_missing=args.skip_missing,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
