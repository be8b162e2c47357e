"""The HTTP server (``rollout serve``): OpenAI-compatible routes for evals, a native tokens-in /
tokens-out route for RL clients, admin control routes and Prometheus metrics, on FastAPI + uvicorn
over ``AsyncLLM``. Needs the ``server`` extra (``pip install rollout-engine[server]``).

    from rollout.server.app import build_app
    from rollout.server.state import ServerConfig

Nothing is imported here, so ``rollout`` and its CLI work without the extra installed.
"""
