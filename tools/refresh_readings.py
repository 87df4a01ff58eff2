"""What NDPP's and ODPP's refreshes did in a work directory, per arm and seed: the manipulation
check of a strength study (method.md §11), read from each new model's `metrics.jsonl`.

    python tools/refresh_readings.py runs/calibrated_confirmation --seeds=100,101 [--json=out.json]

Per arm (a `new_<arm>` folder of `seed_<s>`) and seed: the realised ρ at the refreshes (median,
lowest, highest), the median common-mode fraction, the lowest fraction of perturbed positives
still nearest their own class, the mean L_comp from step 200 on and L_cls at the last logged
step (arms without refreshes, such as BCT, give the last two alone). Printed as a Markdown table
over seeds (medians of the per-seed medians, extremes of the extremes, means of the losses);
`--json` keeps the per-seed readings.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

LOSSES_FROM_STEP = 200  # past the first refresh of the built-in benchmark's regime configs


def seed_readings(metrics: pathlib.Path) -> dict:
    """One stage's readings from its metrics.jsonl (see the module's docstring)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    refreshes = [r for r in rows if r.get('event') == 'refresh']
    train = [r for r in rows if 'event' not in r and 'comp' in r]
    if not train:
        raise ValueError(f'{metrics}: no training rows with a compatibility loss')
    late = [r['comp'] for r in train if r['step'] >= LOSSES_FROM_STEP] or [train[-1]['comp']]
    out = {'comp_late': statistics.mean(late), 'cls_last': train[-1]['cls']}
    if refreshes:
        rho = [r['rho'] for r in refreshes]
        out.update(
            refreshes=len(refreshes),
            rho_median=statistics.median(rho),
            rho_min=min(rho),
            rho_max=max(rho),
            common_mode_median=statistics.median(r['common_mode'] for r in refreshes),
            own_nearest_min=min(r['own_nearest'] for r in refreshes),
        )
    return out


def readings(workdir: pathlib.Path, seeds: list[int]) -> dict:
    """{arm: {seed: readings}} for every new model with a compatibility loss."""
    out: dict[str, dict[str, dict]] = {}
    for seed in seeds:
        folder = workdir / f'seed_{seed}'
        if not folder.is_dir():
            raise FileNotFoundError(f'{folder} does not exist')
        for metrics in sorted(folder.glob('new_*/metrics.jsonl')):
            rows = metrics.read_text()
            if '"comp"' not in rows:  # independent: no compatibility loss
                continue
            arm = metrics.parent.name[len('new_') :]
            out.setdefault(arm, {})[str(seed)] = seed_readings(metrics)
    return out


def table(per_arm: dict) -> str:
    """The Markdown table over seeds."""
    lines = [
        '| arm | seeds | realised ρ: median (range) | common mode | own nearest, lowest '
        f'| L_comp from step {LOSSES_FROM_STEP} | L_cls at the end |',
        '|---|---|---|---|---|---|---|',
    ]
    for arm, by_seed in per_arm.items():
        v = list(by_seed.values())
        losses = '{:.2f} | {:.2f}'.format(
            statistics.mean(x['comp_late'] for x in v), statistics.mean(x['cls_last'] for x in v)
        )
        refreshed = [x for x in v if 'rho_median' in x]
        perturbation = (
            '{:.2f} ({:.2f}–{:.2f}) | {:.2f} | {:.2f}'.format(
                statistics.median(x['rho_median'] for x in refreshed),
                min(x['rho_min'] for x in refreshed),
                max(x['rho_max'] for x in refreshed),
                statistics.median(x['common_mode_median'] for x in refreshed),
                min(x['own_nearest_min'] for x in refreshed),
            )
            if refreshed
            else ' |  | '
        )
        lines.append(f'| {arm} | {len(v)} | {perturbation} | {losses} |')
    return '\n'.join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('workdir', type=pathlib.Path)
    parser.add_argument('--seeds', required=True, help='comma-separated, e.g. 100,101')
    parser.add_argument('--json', type=pathlib.Path, help='write the per-seed readings here')
    args = parser.parse_args(argv)
    per_arm = readings(args.workdir, [int(s) for s in args.seeds.split(',')])
    if args.json:
        args.json.write_text(json.dumps(per_arm, indent=1, sort_keys=True) + '\n')
    print(table(per_arm))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
