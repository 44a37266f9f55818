"""Run by every Python kernel at its start (``IPKernelApp.exec_files``), in the user's namespace.

It gives results what E2B's interpreter gives them: a pandas DataFrame shown also carries its
columns as ``e2b/data`` (a result's ``data``); a matplotlib figure shown also carries its chart
data as ``e2b/chart`` (a result's ``chart``, from E2B's charts library); and an image shown with
PIL (``Image.show()``, which has no viewer to open here) or saved to a file (as ``savefig``
does through PIL) is displayed, so it comes back as a PNG result. It leaves no name behind.
"""


def _bilik_kernel_startup() -> None:
    import json
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter, JSONFormatter
    from traitlets import ObjectName, Unicode

    shell = get_ipython()
    if shell is None:
        return

    def plain(value):  # (numpy numbers, enums, tuples in it: plain JSON out)
        return json.loads(json.dumps(value, default=str))

    def frame_data(frame):
        import pandas

        columns = frame.to_dict(orient="list")
        return plain(
            {
                str(name): [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in values]
                for name, values in columns.items()
            }
        )

    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)

        def __call__(self, obj):
            # (by type, once pandas is loaded: the module pandas names DataFrame's differs
            # between its versions, so a lookup by name would miss)
            pandas = sys.modules.get("pandas")
            if pandas is not None and isinstance(obj, pandas.DataFrame):
                try:
                    return frame_data(obj)
                except Exception:
                    return None
            return super().__call__(obj)

    class ChartFormatter(JSONFormatter):  # (returns a dict, as JSON does)
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")

        def pop(self, typ, default=None):
            # matplotlib's inline backend pops Figure from every formatter when it sets its
            # formats up: this one keeps it.
            return default

    def chart(figure):
        try:
            from e2b_charts import chart_figure_to_dict

            return plain(chart_figure_to_dict(figure))
        except Exception:
            return None

    data = DataFormatter(parent=shell.display_formatter)
    charts = ChartFormatter(parent=shell.display_formatter)
    charts.for_type_by_name("matplotlib.figure", "Figure", chart)
    for formatter in (data, charts):
        shell.display_formatter.formatters[formatter.format_type] = formatter
        # Only the types listed when the shell started are computed: add ours.
        if formatter.format_type not in shell.display_formatter.active_types:
            shell.display_formatter.active_types.append(formatter.format_type)

    try:
        from PIL import Image, ImageShow
    except ImportError:
        return
    from IPython.display import display

    class Shown(ImageShow.Viewer):
        """The first viewer PIL tries: it displays the image (no other is tried)."""

        def show(self, image, **options):
            display(image)
            return 1

    ImageShow.register(Shown(), order=-1)
    saved = Image.Image.save

    def save(self, fp, format=None, **params):
        if isinstance(fp, str):
            display(self)
        return saved(self, fp, format, **params)

    Image.Image.save = save


_bilik_kernel_startup()
del _bilik_kernel_startup
