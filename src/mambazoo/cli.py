"""``mambazoo <command>``: a thin command-line layer over the library.

Commands:
    train --config CONFIG.yaml [--set key=value ...] [--resume]   train and validate
    validate --model NAME [--checkpoint PATH] --data DIR          top-1/top-5, loss, images/s
    predict IMAGE... --model NAME [--checkpoint PATH] [--json]   top-k classes per image
    list [PATTERN]                                                registered model names
    random-checkpoint --model NAME --out PATH                     save randomly initialised weights
"""
import argparse
import ast
import json
import logging
import sys
from typing import List, Optional

__all__ = ['main']


def _parse_kwargs(items: Optional[List[str]]) -> dict:
    """``key=value`` pairs (values as Python literals, else strings), as timm's --model-kwargs."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'error: --model-kwargs expects key=value, got {item!r}')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _cmd_list(args: argparse.Namespace) -> int:
    import mambazoo
    for name in mambazoo.list_models(args.pattern, include_aliases=args.aliases):
        print(name)
    return 0


def _cmd_random_checkpoint(args: argparse.Namespace) -> int:
    import torch
    import mambazoo
    torch.manual_seed(args.seed)
    model = mambazoo.create_model(args.model, num_classes=args.num_classes, **_parse_kwargs(args.model_kwargs))
    # The official release layout: weights under 'state_dict'.
    torch.save({'state_dict': model.state_dict(), 'arch': args.model}, args.out)
    print(f'wrote randomly initialised {args.model} weights (seed {args.seed}) to {args.out}')
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    import mambazoo
    from mambazoo.predict import classify_files

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = mambazoo.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                                      num_classes=args.num_classes, **_parse_kwargs(args.model_kwargs))
    except (ValueError, mambazoo.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    model.to(args.device)
    results, timing = classify_files(model, args.images, topk=args.topk, batch_size=args.batch_size)
    failed = [r for r in results if r.error]
    if args.json:
        print(json.dumps({
            'model': args.model, 'checkpoint': args.checkpoint,
            'results': [{'path': r.path, 'error': r.error,
                         'top': [{'label': lab, 'index': i, 'probability': p} for lab, i, p in r.top]}
                        for r in results],
            'timing': timing,
        }, indent=2))
    else:
        for r in results:
            if r.error:
                print(f'{r.path}: ERROR {r.error}', file=sys.stderr)
                continue
            print(r.path)
            for rank, (label, index, prob) in enumerate(r.top, 1):
                print(f'  {rank}. {prob * 100:6.2f}%  {label} ({index})')
        print(f'throughput: {timing["images"]} images in {timing["seconds"]:.3f} s = '
              f'{timing["images_per_s"]:.1f} images/s ({args.model}, {args.device}, batch {args.batch_size}, '
              f'{torch.get_num_threads()} threads)')
    if failed:
        print(f'{len(failed)} of {len(results)} files could not be classified', file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mambazoo.data import DatasetNotFoundError
    from mambazoo.train import load_config, train
    config = load_config(args.config, args.set or [])
    if args.output:
        config['train']['output'] = args.output
    try:
        result = train(config, resume=args.resume)
    except DatasetNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if result['rank'] != 0:
        return 0
    final = result['final']
    print(f'final: val top-1 {final.get("val_top1", float("nan")):.2f}%, top-5 {final.get("val_top5", float("nan")):.2f}%, '
          f'best top-1 {result["best_top1"]:.2f}% (epoch {result["best_epoch"]}), {result["seconds"]:.0f} s')
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import mambazoo
    from mambazoo.data import DatasetNotFoundError
    from mambazoo.train.validate import validate
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        metrics = validate(args.model, args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                           img_size=args.img_size, crop_pct=args.crop_pct, device=args.device, use_ema=args.ema,
                           model_kwargs=_parse_kwargs(args.model_kwargs))
    except (DatasetNotFoundError, ValueError, mambazoo.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f'{metrics["model"]} on {metrics["data"]} ({metrics["count"]} images): top-1 {metrics["top1"]:.2f}%, '
              f'top-5 {metrics["top5"]:.2f}%, loss {metrics["loss"]:.4f}, {metrics["images_per_s"]:.0f} images/s')
        for path in metrics.get('skipped_files', []):
            print(f'  skipped unreadable image {path}', file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='mambazoo', description=__doc__.split('\n')[0])
    parser.add_argument('-v', '--verbose', action='store_true', help='log at INFO level')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('predict', help='classify images (top-k)')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--model', required=True, help='model name or official alias (see `mambazoo list`)')
    p.add_argument('--checkpoint', help='local checkpoint file or folder')
    p.add_argument('--pretrained', action='store_true', help='official weights from the local Hugging Face cache')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra model arguments')
    p.add_argument('--topk', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser('train', help='train a model from a YAML config')
    p.add_argument('--config', help='YAML recipe (configs/*.yaml); built-in defaults otherwise')
    p.add_argument('--set', nargs='*', metavar='KEY=VALUE', help='override config keys, e.g. sched.epochs=5')
    p.add_argument('--output', help='run folder (train.output)')
    p.add_argument('--resume', nargs='?', const='auto', default=None,
                   help='resume from a checkpoint (default: the run folder\'s last.pth)')
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser('validate', help='top-1/top-5 of a model on a dataset')
    p.add_argument('--model', help='model name (optional for checkpoints written by `mambazoo train`)')
    p.add_argument('--checkpoint')
    p.add_argument('--data', default='fashion_mnist', help='fashion_mnist, digits, or an ImageFolder root')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--img-size', type=int)
    p.add_argument('--crop-pct', type=float)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--ema', action='store_true', help='evaluate the EMA weights')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser('list', help='list model names')
    p.add_argument('pattern', nargs='?', default='*')
    p.add_argument('--aliases', action='store_true', help='include the official names')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('random-checkpoint', help='save randomly initialised weights (for smoke tests)')
    p.add_argument('--model', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra model arguments')
    p.set_defaults(func=_cmd_random_checkpoint)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
