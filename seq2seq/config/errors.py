"""The one exception every recipe problem is reported with."""

from __future__ import annotations


class RecipeError(Exception):
    """One or more problems with a recipe; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
