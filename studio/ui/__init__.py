"""The studio in the browser (Gradio): ``launch()`` starts it, ``build_app()`` builds the page.

Each tab is one module with the same two entry points: ``build(studio)`` lays out its
widgets and events, ``register_api(studio)`` adds its named endpoints for gradio_client.
"""
from studio.ui.app import build_app, launch  # noqa: F401
