"""``mambazoo <command>``: a thin command-line layer over the library.

Commands (a model is named by --model NAME, or given as a trained model file: --checkpoint PATH alone, for a
checkpoint written by ``mambazoo train`` or a folder written by ``export --format folder``):
    train --config CONFIG.yaml [--set key=value ...] [--resume] [--overwrite]   train, validate, test
    train --task detection|segmentation --config CONFIG.yaml       Faster/Mask R-CNN or FPN segmentation
    validate (--model NAME | --checkpoint PATH) --data DIR          top-1/top-5, loss, images/s
    predict IMAGE... (--model NAME | --checkpoint PATH) [--json]    top-k classes per image
    list [PATTERN]                                                 registered model names
    random-checkpoint --model NAME --out PATH                      save randomly initialised weights
    demo (--model NAME | --checkpoint PATH) [--port N]             Gradio web demo on this machine
    benchmark (--model NAME... | --checkpoint PATH) [--baseline NAME...] [--sweep] [--train] [--json]
    flops (--model NAME | --checkpoint PATH) [--img-size N]        parameters, FLOPs (MACs), published figures
    analyze erf|activations (--model NAME | --checkpoint PATH) --data DIR   ERF / activation-map PNGs
    summary (--model NAME | --checkpoint PATH)                     stages, blocks, shapes, parameters, FLOPs
    show-data --data NAME|DIR                                      labelled grid of sample images, PNG
    export (--model NAME | --checkpoint PATH) --format onnx|torchscript|folder --out PATH [--verify]

Errors the user can fix (usage, config, data, checkpoints, files) print one ``error: ...`` line and exit with
status 2; ``--debug`` shows the traceback instead.
"""
import argparse
import ast
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['main', 'UsageError']


class UsageError(ValueError):
    """A command line that cannot run as given."""


def _parse_kwargs(items: Optional[List[str]]) -> dict:
    """``key=value`` pairs (values as Python literals, else strings), as timm's --model-kwargs."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UsageError(f'--model-kwargs expects key=value, got {item!r}')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _model_kwargs(args: argparse.Namespace) -> dict:
    """--model-kwargs, plus --num-classes where given: create_model passes an explicit None on to the model, so an
    option the user did not set is left out."""
    kwargs = _parse_kwargs(getattr(args, 'model_kwargs', None))
    if getattr(args, 'num_classes', None) is not None:
        kwargs['num_classes'] = args.num_classes
    return kwargs


def _check_device(name: str) -> None:
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'unknown device {name!r}: use cpu or cuda[:N]') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); '
                         f'use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device {name}: use cpu or cuda[:N]')


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UsageError(f'{name} must be at least 1, got {value}')


def _opened_record(args: argparse.Namespace):
    """(record, weights source) of the trained model file --checkpoint, read once; an error when it does not say
    which model it holds."""
    from mambazoo.models import CheckpointError
    from mambazoo.models.model_file import open_model_file
    if not getattr(args, 'checkpoint', None):
        raise UsageError('name a model (--model NAME, see `mambazoo list`) or a trained model file (--checkpoint PATH)')
    record, source = open_model_file(args.checkpoint, trusted=getattr(args, 'trusted', False))
    if record is None:
        raise CheckpointError(f'{args.checkpoint} does not record which model it holds (only checkpoints written by '
                              f'`mambazoo train` and exported folders do): name it with --model NAME')
    return record, source


def _architecture(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    """The model name and arguments a command builds: --model and its options, or the record of the trained model
    file --checkpoint (its name, arguments and evaluation config; --model-kwargs still win)."""
    from mambazoo.models.model_file import recorded_cfg
    kwargs = _model_kwargs(args)
    if args.model:
        return args.model, kwargs
    record, _ = _opened_record(args)
    return record['name'], {**record['args'], 'pretrained_cfg_overlay': recorded_cfg(record), **kwargs}


def _load_model(args: argparse.Namespace, purpose: str):
    """(model in eval mode, its name, the arguments it was built with beside the name): from --checkpoint alone when
    it records its model, else --model NAME with --checkpoint / --pretrained weights. Says so on stderr when the
    weights are random (``purpose`` says what they would be used for)."""
    import mambazoo
    kwargs = _model_kwargs(args)
    trusted = getattr(args, 'trusted', False)
    pretrained = getattr(args, 'pretrained', False)
    if args.model is None:
        from mambazoo.models.model_file import model_from_file
        record, source = _opened_record(args)
        model = model_from_file(record, source, args.checkpoint, overrides=kwargs)
        return model, record['name'], {**record['args'], **kwargs}
    model = mambazoo.create_model(args.model, pretrained=pretrained, checkpoint_path=args.checkpoint,
                                  trusted=trusted, **kwargs).eval()
    if args.checkpoint is None and not pretrained:
        print(f'note: {args.model} has random weights (no --checkpoint or --pretrained): its {purpose} mean nothing',
              file=sys.stderr)
    return model, args.model, kwargs


def _cmd_list(args: argparse.Namespace) -> int:
    import mambazoo
    for name in mambazoo.list_models(args.pattern, include_aliases=args.aliases):
        print(name)
    return 0


def _cmd_random_checkpoint(args: argparse.Namespace) -> int:
    import torch
    import mambazoo
    torch.manual_seed(args.seed)
    model = mambazoo.create_model(args.model, **_model_kwargs(args))
    # The official release layout: weights under 'state_dict'.
    torch.save({'state_dict': model.state_dict(), 'arch': args.model}, args.out)
    print(f'wrote randomly initialised {args.model} weights (seed {args.seed}) to {args.out}')
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    import mambazoo
    from mambazoo.predict import classify_files

    _positive('--topk', args.topk)
    _positive('--batch-size', args.batch_size)
    _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name, _ = _load_model(args, 'predictions')
    model.to(args.device)
    if args.device == 'cpu':
        mambazoo.optimize_for_cpu(model)  # the machine's faster GEMM for the linear layers (same results)
    results, timing = classify_files(model, args.images, topk=args.topk, batch_size=args.batch_size)
    failed = [r for r in results if r.error]
    if args.json:
        print(json.dumps({
            'model': name, 'checkpoint': args.checkpoint,
            'results': [{'path': r.path, 'error': r.error,
                         'top': [{'label': lab, 'index': i, 'probability': p} for lab, i, p in r.top]}
                        for r in results],
            'timing': timing,
        }, indent=2))
    else:
        for r in results:
            if r.error:
                print(f'error: {r.error}', file=sys.stderr)
                continue
            print(r.path)
            for rank, (label, index, prob) in enumerate(r.top, 1):
                print(f'  {rank}. {prob * 100:6.2f}%  {label} ({index})')
        print(f'throughput: {timing["images"]} images in {timing["seconds"]:.3f} s = '
              f'{timing["images_per_s"]:.1f} images/s ({name}, {args.device}, batch {args.batch_size}, '
              f'{torch.get_num_threads()} threads)')
    if failed:
        print(f'{len(failed)} of {len(results)} files could not be classified', file=sys.stderr)
        return 1
    return 0


_TASKS = ('classification', 'detection', 'segmentation')


def _cmd_train(args: argparse.Namespace) -> int:
    from mambazoo.train import load_config, train
    config = load_config(args.config, args.set or [])
    if args.output:
        config['train']['output'] = args.output
    if args.task:
        config['task'] = args.task
    if config['task'] not in _TASKS:
        raise UsageError(f'task must be one of {", ".join(_TASKS)}, got {config["task"]!r}')
    if config['train']['device'] not in ('auto', 'cpu'):
        _check_device(config['train']['device'])
    if config['task'] == 'classification':
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    else:
        from mambazoo.downstream.train import train_downstream
        result = train_downstream(config, resume=args.resume, overwrite=args.overwrite)
    if result['rank'] != 0:
        return 0
    final = result['final']
    if config['task'] != 'classification':
        shown = ', '.join(f'{k} {v:.4f}' for k, v in final.items() if k not in ('step', 'lr', 'elapsed_s'))
        print(f'final ({config["task"]}, step {final.get("step")}): {shown}; best {result["metric"]} '
              f'{result["best"]:.4f} (step {result["best_step"]}), {result["seconds"]:.0f} s')
        return 0
    test = result.get('test')
    tested = (f'; test top-1 {test["top1"]:.2f}%, top-5 {test["top5"]:.2f}% ({test["count"]} images, best.pth)'
              if test else '')
    print(f'final: val top-1 {final.get("val_top1", float("nan")):.2f}%, best val top-1 {result["best_top1"]:.2f}% '
          f'(epoch {result["best_epoch"]}; validation: {result["val_source"]}){tested}, {result["seconds"]:.0f} s')
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import mambazoo
    from mambazoo.demo import build_demo, launch
    from mambazoo.predict import class_names
    model, _, _ = _load_model(args, 'predictions')
    mambazoo.optimize_for_cpu(model)  # the machine's faster GEMM for the linear layers (same results)
    demo = build_demo(model, class_names(model))
    try:
        launch(demo, host=args.host, port=args.port)
    except OSError as e:  # port taken, or an address this machine does not have
        raise UsageError(f'cannot serve the demo at {args.host}:{args.port}: {e}') from e
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from mambazoo.train.validate import validate
    _positive('--batch-size', args.batch_size)
    _check_device(args.device)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    metrics = validate(args.model, args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                       img_size=args.img_size, crop_pct=args.crop_pct, device=args.device,
                       use_ema=True if args.ema else None, model_kwargs=_parse_kwargs(args.model_kwargs),
                       trusted=args.trusted)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f'{metrics["model"]} on {metrics["data"]} ({metrics["count"]} images): top-1 {metrics["top1"]:.2f}%, '
              f'top-5 {metrics["top5"]:.2f}%, loss {metrics["loss"]:.4f}, {metrics["images_per_s"]:.0f} images/s')
        for path in metrics.get('skipped_files', []):
            print(f'  skipped unreadable image {path}', file=sys.stderr)
    return 0


_ANALYSIS_DIR = 'outputs/analysis'


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import torch
    from mambazoo.analysis.benchmark import DEFAULT_SWEEP, benchmark_report, format_benchmark_table, run_benchmark
    _positive('--batch-size', args.batch_size)
    _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and args.checkpoint:
        raise UsageError('benchmark takes --model NAME... or --checkpoint PATH (a trained model file), not both')
    models, model_kwargs = (args.model, _parse_kwargs(args.model_kwargs)) if args.model else (None, None)
    img_size = args.img_size
    if models is None:
        name, model_kwargs = _architecture(args)
        models = [name]
        img_size = img_size or (model_kwargs['pretrained_cfg_overlay'].get('input_size') or [None])[-1]
    try:
        sweep = ','.join(map(str, DEFAULT_SWEEP)) if args.sweep == 'vim' else args.sweep
        sizes = [int(s) for s in sweep.split(',')] if sweep else [img_size or 224]
    except ValueError:
        raise UsageError(f'--sweep expects comma-separated sizes, e.g. 224,512,1024; got {args.sweep!r}') from None
    cuda = args.device.startswith('cuda')
    results = run_benchmark(models, args.baseline or [], sizes, batch_size=args.batch_size,
                            device=args.device, amp=args.amp, amp_dtype=args.amp_dtype, train=args.train,
                            latency=not args.no_latency, warmup=args.warmup if args.warmup is not None else
                            (10 if cuda else 2), iters=args.iters or (30 if cuda else 5),
                            model_kwargs=model_kwargs,
                            log=None if args.json else lambda m: print(m, file=sys.stderr))
    report = benchmark_report(results, args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        env = report['environment']
        print(f'# {env["device_name"]}, torch {env["torch"]}, timm {env["timm"]}, {env["threads"]} threads, '
              f'{results[0].precision}, batch {args.batch_size}; GFLOPs: {env["flops_convention"]}; '
              f'peak memory: {env["memory_method"]}; "x ref": / {results[0].model} at the same size')
        print(format_benchmark_table(results))
    if args.out:
        from pathlib import Path
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f'wrote {args.out}', file=sys.stderr if args.json else sys.stdout)
    return 0 if all(r.error is None for r in results) else 1


def _cmd_flops(args: argparse.Namespace) -> int:
    from mambazoo.analysis.flops import CONVENTION, PUBLISHED_FLOPS, count_model_flops
    _positive('--batch-size', args.batch_size)
    _positive('--img-size', args.img_size)
    name, kwargs = _architecture(args)
    count, params, model = count_model_flops(name, img_size=args.img_size, batch_size=args.batch_size, **kwargs)
    args.img_size = args.img_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    args.model = name
    published = PUBLISHED_FLOPS.get(name) if not args.model_kwargs and not args.checkpoint and args.img_size == 224 \
        else None
    report = {'model': name, 'img_size': args.img_size, 'batch_size': args.batch_size,
              'params': params, 'gflops': count.gflops, 'convention': CONVENTION,
              'by_op_gflops': {k: v / 1e9 for k, v in count.by_op.items()}}
    if published:
        report['published'] = {'gflops': published.gflops, 'source': published.source,
                               'excludes': list(published.excludes),
                               'ours_in_that_convention': count.total_without(published.excludes) / 1e9,
                               'matches': published.matches(count)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f'{args.model} at {report["img_size"]}x{report["img_size"]}, batch {args.batch_size}: '
          f'{params / 1e6:.2f}M parameters, {count.gflops:.3f} GFLOPs')
    print(f'  convention: {CONVENTION}; multiply by 2 for arithmetic FLOPs')
    print('  by operator: ' + ', '.join(f'{k} {v / 1e9:.3f}G' for k, v in
                                         sorted(count.by_op.items(), key=lambda kv: -kv[1])))
    if published:
        p = report['published']
        left_out = f' without {", ".join(published.excludes)}' if published.excludes else ''
        print(f'  published: {published.gflops}G ({published.source}); ours{left_out}: '
              f'{p["ours_in_that_convention"]:.3f}G ({(p["ours_in_that_convention"] / published.gflops - 1) * 100:+.1f}%)')
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path
    from mambazoo.analysis.activations import activation_maps, load_images, save_activation_figure
    from mambazoo.analysis.erf import compute_erf, erf_heatmap, high_contribution_area_ratio, save_erf_png
    _positive('--num-images', args.num_images)
    _positive('--img-size', args.img_size)
    model, name, _ = _load_model(args, 'maps')
    limit = args.num_images if args.num_images is not None else (8 if args.what == 'erf' else 4)
    images, crops, files = load_images(args.data, model, img_size=args.img_size, limit=limit)
    if args.what == 'erf':
        erf = compute_erf(model, images, stage=args.stage)
        out = Path(args.out or f'{_ANALYSIS_DIR}/{name}_erf_stage{args.stage}.png')
        save_erf_png(erf, out, title=f'{name} ERF, stage {args.stage}, {len(files)} images '
                                     f'{images.shape[-2]}x{images.shape[-1]}')
        ratios = high_contribution_area_ratio(erf_heatmap(erf))
        print('high-contribution area ratio (RepLKNet): ' + ', '.join(
            f'{t:g}: {"-" if r is None else f"{r:.3f}"}' for t, r in ratios.items()))
    else:
        stages = [int(s) for s in args.stages.split(',')] if args.stages else None
        maps = activation_maps(model, images, indices=stages, reduction=args.reduction)
        out = Path(args.out or f'{_ANALYSIS_DIR}/{name}_activations.png')
        titles = [f'stage {s} ({m.shape[-2]}x{m.shape[-1]})' for s, m in zip(stages or range(len(maps)), maps)]
        save_activation_figure(crops, maps, out, titles=titles, alpha=args.alpha)
    print(f'wrote {out}')
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    import torch
    import mambazoo
    from dataclasses import asdict
    from mambazoo.analysis.summary import format_summary, summarize
    _positive('--img-size', args.img_size)
    name, kwargs = _architecture(args)
    with torch.device('meta'):  # shapes only: any size of model in a fraction of a second
        model = mambazoo.create_model(name, **kwargs)
    in_chans, height, width = model.pretrained_cfg.get('input_size', (3, 224, 224))
    if args.img_size:
        height = width = args.img_size
    summary = summarize(model, (in_chans, height, width), name=name)
    print(json.dumps(asdict(summary), indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_show_data(args: argparse.Namespace) -> int:
    from pathlib import Path
    from mambazoo.analysis.plots import dataset_samples, save_image_grid
    from mambazoo.data import build_data
    from mambazoo.train import load_config
    _positive('--count', args.count)
    # data.aug.batched=false: the samples shown go through the per-image transforms one at a time
    config = load_config(overrides=[f'data.img_size={args.img_size}', 'data.holdout=0', 'data.aug.batched=false'])
    root = Path(args.data)
    if root.is_dir():
        config['data'].update(name='imagefolder', path=str(root))
        if not (root / 'train').is_dir():  # class folders right under the root: one split
            config['data'].update(train_split='.', val_split='.')
    else:
        config['data']['name'] = args.data
    bundle = build_data(config)
    dataset = bundle.train if args.split == 'train' else bundle.val
    if not args.augment:
        dataset.transform = bundle.val.transform  # the evaluation view: resize and center crop only
    images, labels = dataset_samples(dataset, args.count, seed=args.seed)
    out = Path(args.out or f'{_ANALYSIS_DIR}/{Path(args.data).name}_{args.split}_samples.png')
    view = 'training augmentation' if args.augment else 'evaluation transform'
    save_image_grid(images, [bundle.classes[i] for i in labels], out, mean=bundle.mean, std=bundle.std,
                    title=f'{args.data} ({args.split}, {len(dataset)} images, {len(bundle.classes)} classes), '
                          f'{view}')
    print(f'wrote {out}')
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path
    from mambazoo import export
    if args.dynamic_batch and args.format != 'onnx':
        raise UsageError('--dynamic-batch applies to --format onnx only')
    _positive('--img-size', args.img_size)
    out = Path(args.out)
    if args.format != 'folder' and out.is_dir():
        raise UsageError(f'--out {out} is a folder: --format {args.format} writes one file (e.g. {out}/model.'
                         f'{"onnx" if args.format == "onnx" else "pt"})')
    if args.format == 'folder' and out.exists() and not out.is_dir():
        raise UsageError(f'--out {out} is a file: --format folder writes a folder')
    model, name, model_kwargs = _load_model(args, 'outputs')
    if args.format == 'onnx':
        path = export.export_onnx(model, out, img_size=args.img_size, dynamic_batch=args.dynamic_batch,
                                  opset=args.opset, optimize=not args.no_optimize)
    elif args.format == 'torchscript':
        path = export.export_torchscript(model, out, img_size=args.img_size)
    else:
        path = export.export_folder(model, out, name, model_args=model_kwargs, img_size=args.img_size)
    print(f'wrote {name} as {args.format} to {path}')
    if args.verify:
        verify = {'onnx': export.verify_onnx, 'torchscript': export.verify_torchscript,
                  'folder': export.verify_folder}[args.format]
        x = export.reference_image(model, args.img_size)
        diff = verify(path, model, x)
        print(f'verify: max abs difference to PyTorch on a real image (skimage astronaut, '
              f'{x.shape[-2]}x{x.shape[-1]}): {diff:.3g}')
        if not diff <= args.tolerance:
            print(f'error: the export differs from PyTorch by more than {args.tolerance:g}', file=sys.stderr)
            return 1
    return 0


def _model_arguments(p: argparse.ArgumentParser, pretrained: bool = True, weights: bool = True) -> None:
    """--model / --checkpoint / --trusted (and --pretrained) of a command that builds one model."""
    p.add_argument('--model', help='model name or official alias (see `mambazoo list`); not needed with a trained '
                                   'model file (--checkpoint written by `mambazoo train` or `export --format folder`)')
    p.add_argument('--checkpoint', help='checkpoint file or folder' + ('' if weights else ' (its recorded architecture)'))
    p.add_argument('--trusted', action='store_true',
                   help='allow a pickled checkpoint to hold any Python object (loading it could run code)')
    if pretrained:
        p.add_argument('--pretrained', action='store_true', help='official weights from the local Hugging Face cache')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='mambazoo', description=__doc__.split('\n')[0])
    parser.add_argument('-v', '--verbose', action='store_true', help='log at INFO level')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('predict', help='classify images (top-k)')
    p.add_argument('images', nargs='+', help='image files')
    _model_arguments(p)
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
                   help='resume from a checkpoint (default: the run folder\'s last.pth; an error when there is none)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run the output folder holds (without it, such a folder is refused)')
    p.add_argument('--task', choices=_TASKS, default=None,
                   help="classification, or detection / segmentation on the backbone (default: the config's "
                        "'task', classification unless it says otherwise; see docs/downstream.md)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser('validate', help='top-1/top-5 of a model on a dataset')
    _model_arguments(p, pretrained=False)
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

    p = sub.add_parser('demo', help='Gradio web demo: upload an image, see top-5 and an activation map')
    _model_arguments(p)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra model arguments')
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (default: this machine only)')
    p.add_argument('--port', type=int, default=7860)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser('benchmark', help='images/s, latency, peak memory of our models and timm models side by side')
    p.add_argument('--model', nargs='+', help='models (mambazoo or timm names); the first is the reference of the '
                                              'ratios')
    p.add_argument('--checkpoint', help='a trained model file instead of --model: its architecture and input size')
    p.add_argument('--trusted', action='store_true', help='allow a pickled checkpoint to hold any Python object')
    p.add_argument('--baseline', nargs='*', help='more models to compare with, e.g. timm names (deit_tiny_patch16_224)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--sweep', nargs='?', const='vim', metavar='SIZES',
                   help='comma-separated input sizes (alone: the Vim paper\'s high-resolution sweep, '
                        '224,512,640,768,1024,1248)')
    p.add_argument('--device', default='cpu', help='cpu or cuda[:N]')
    p.add_argument('--amp', action='store_true', help='autocast (float16 on CUDA, bfloat16 on CPU)')
    p.add_argument('--amp-dtype', choices=['float16', 'bfloat16'])
    p.add_argument('--train', action='store_true', help='also time training steps (forward + backward + AdamW)')
    p.add_argument('--no-latency', action='store_true', help='skip the batch-1 latency')
    p.add_argument('--warmup', type=int, default=None, help='untimed runs (default 2 on CPU, 10 on CUDA)')
    p.add_argument('--iters', type=int, default=None, help='timed runs, median taken (default 5 on CPU, 30 on CUDA)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra arguments of the mambazoo models')
    p.add_argument('--json', action='store_true', help='print JSON instead of the table')
    p.add_argument('--out', help='also write the JSON report to this file')
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser('flops', help='parameters and FLOPs (multiply-adds, as the papers count), vs published')
    _model_arguments(p, pretrained=False, weights=False)
    p.add_argument('--img-size', type=int, help='square input size (default: the model\'s, 224)')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser('analyze', help='effective receptive field or activation maps, as PNG')
    p.add_argument('what', choices=['erf', 'activations'])
    _model_arguments(p)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--data', required=True, help='an image file or a folder of images (searched recursively)')
    p.add_argument('--num-images', type=int, default=None, help='images used (default: 8 for erf, 4 for activations)')
    p.add_argument('--img-size', type=int, help='square input size (default: the model\'s)')
    p.add_argument('--stage', type=int, default=-1, help='erf: the stage whose centre is followed (default: last)')
    p.add_argument('--stages', help='activations: comma-separated stages (default: all)')
    p.add_argument('--reduction', choices=['mean_abs', 'l2'], default='mean_abs', help='activations: channel reduction')
    p.add_argument('--alpha', type=float, default=0.5, help='activations: heatmap opacity')
    p.add_argument('--out', help='PNG path (default: outputs/analysis/<model>_<what>.png)')
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser('summary', help='the architecture as a table: stages, blocks, shapes, parameters, FLOPs')
    _model_arguments(p, pretrained=False, weights=False)
    p.add_argument('--img-size', type=int)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser('show-data', help='a labelled grid of sample images of a dataset, as PNG')
    p.add_argument('--data', default='fashion_mnist', help='fashion_mnist, digits, fake, or an ImageFolder root '
                                                           '(holding train/ and val/)')
    p.add_argument('--split', choices=['train', 'val'], default='train')
    p.add_argument('--count', type=int, default=16)
    p.add_argument('--augment', action='store_true', help='show the training augmentation (default: evaluation view)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='PNG path (default: outputs/analysis/<data>_<split>_samples.png)')
    p.set_defaults(func=_cmd_show_data)

    p = sub.add_parser('export', help='export a model as ONNX, TorchScript or a Hugging Face style folder')
    _model_arguments(p)
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra model arguments')
    p.add_argument('--format', required=True, choices=['onnx', 'torchscript', 'folder'],
                   help='onnx (torch dynamo exporter), torchscript (traced) or folder (config.json + safetensors)')
    p.add_argument('--out', required=True, help='output file (onnx, torchscript) or folder')
    p.add_argument('--img-size', type=int, default=None, help='input height = width (default: the pretrained size)')
    p.add_argument('--dynamic-batch', action='store_true', help='ONNX: a symbolic batch dimension')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset version')
    p.add_argument('--no-optimize', action='store_true',
                   help='ONNX: skip onnxscript\'s graph optimiser (minutes on 24-block models; ONNX Runtime '
                        'optimises the graph itself when it loads it)')
    p.add_argument('--verify', action='store_true',
                   help='run the export on a real image and print the max abs difference to PyTorch')
    p.add_argument('--tolerance', type=float, default=1e-4, help='--verify fails above this difference')
    p.set_defaults(func=_cmd_export)
    return parser


def _user_errors() -> tuple:
    """Exceptions that mean the user must change something (a file, a flag, a config value), not a bug."""
    import yaml
    from mambazoo.models import CheckpointError
    return (ValueError, OSError, ImportError, CheckpointError, yaml.YAMLError, FloatingPointError)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return '; '.join(line.strip() for line in text.splitlines() if line.strip())  # one line, whatever the message


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    from mambazoo.runtime import tune_cpu_allocator
    tune_cpu_allocator()  # keep freed activations in the heap: fewer page faults on CPU (see runtime.py)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    except _user_errors() as e:
        if args.debug:
            raise
        print(f'error: {_one_line(e)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
