"""A tiny model learns to use a calculator: press the key the question asks for, answer with the result.

Two ways to train the same agent loop (see the README):

- :mod:`rllm_example_calculator.workflow`: the native workflow (``calculator``), talking to the engine;
- :mod:`rllm_example_calculator.agent`: an agent script on the official ``openai`` client, trained
  unmodified through the gateway (the ``blackbox`` workflow of rllm-gateway).

:mod:`~rllm_example_calculator.data` makes the tasks, :mod:`~rllm_example_calculator.reward` scores
a finished conversation. The package root imports nothing, so the agent's own process
(``python -m rllm_example_calculator.agent``) loads only the ``openai`` client.
"""
