"""One recommendation: the request and its rules, the four-stage pipeline, the final order and the result cache."""
