"""The code interpreter: E2B's ``/execute`` API over Jupyter kernels, inside sandboxes.

It runs in code-interpreter templates, with the template's Python (which has the kernels and
``jupyter_client``) and the web server copied with envd to ``/.bilik/agents``.
"""
