"""Matplotlib for the benchmarks' figures, an optional dependency (the `bench` extra)."""


def pyplot():
    """matplotlib.pyplot drawing into files (no display needed); without matplotlib, a one-line
    exit naming the extra, since a traceback would not say how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("lutlm bench: the figures need matplotlib: pip install 'lutlm[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
