"""Structured outputs: constrain sampling to a JSON schema, regex, choice, grammar or structural tag.

- ``params``: ``StructuredOutputsParams`` (vLLM's fields), one constraint per request;
- ``backends``: xgrammar (the default) and llguidance compile constraints into matchers that fill a
  token bitmask and advance token by token;
- ``manager``: compiles off the engine thread with a cache (a request waits in the queue while its
  grammar compiles, without stalling the batch), keeps one matcher per sequence and builds each
  step's bitmask for the rows that need one.
"""

from pageant.engine.structured_outputs.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
