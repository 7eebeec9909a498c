"""A byexample finder for root shell sessions: the README's examples use ``# `` as
the prompt (they run as root), where byexample's own shell finder knows ``$ ``.
Continuation lines start with ``> `` as in a terminal; they run in byexample's bash."""
import byexample.regex as re
from byexample.common import constant
from byexample.modules.shell import ShellPromptFinder

stability = "provisional"


class RootShellPromptFinder(ShellPromptFinder):
    target = "root-shell-prompt"

    @constant
    def example_regex(self):
        return re.compile(
            r"""
            (?P<snippet>
                (?:^(?P<indent> [ ]*) (?:\#)[ ]  .*)      # PS1 line: "# command"
                (?:\n           [ ]*  >             .*)*)    # PS2 lines: "> more"
            \n?
            (?P<expected> (?:(?![ ]*$)                  # not a blank line
                          (?![ ]*(?:\#[ ]))             # not a line starting with PS1
                          .+$\n?
                      )*)
            """, re.MULTILINE | re.VERBOSE,
        )
