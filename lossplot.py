"""
Draw loss.png (train and val loss against iteration) from a train.py run's history.jsonl; read_history reads it.

$ python lossplot.py out/history.jsonl out/loss.png title

train.py runs this in a short-lived child process after each eval: matplotlib would add ~35 MB to the training
process, and the child draws while training goes on. Without matplotlib it warns and draws nothing.
"""
import json
import math
import os
import tempfile
import sys


def read_history(history_path, before=None):
    """The records of history.jsonl (one JSON object per log line and per eval), those of iterations before
    `before` if given; a line cut by a crash, or being written right now, is skipped."""
    records = []
    with open(history_path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if before is None or record.get('iter', math.inf) < before:
                records.append(record)
    return records


def plot(history_path, plot_path, title):
    try:
        import matplotlib
    except ImportError:
        print('warning: matplotlib is not installed, so no loss.png: pip install matplotlib', file=sys.stderr)
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    history = read_history(history_path)
    train = [(r['iter'], r['loss']) for r in history if 'loss' in r]
    evals = [r for r in history if 'val_loss' in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), color='tab:blue', alpha=0.35, lw=1, label='train (batch)')
    ax.plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', color='tab:blue', label='train')
    ax.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', color='tab:orange', label='val')
    ax.set(xlabel='iteration', ylabel='loss', title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fd, tmp = tempfile.mkstemp(prefix='.loss.', suffix='.png', dir=os.path.dirname(plot_path) or '.')
    with os.fdopen(fd, 'wb') as f:  # a new file (never a link left at a fixed name); readers never see half of it
        fig.savefig(f, format='png', dpi=100)
    os.replace(tmp, plot_path)


if __name__ == '__main__':
    plot(*sys.argv[1:])
