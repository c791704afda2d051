"""The user search: an input docked at the top, opened with `/`, completing the users recorded in the run."""

from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.message import Message
from textual.suggester import SuggestFromList
from textual.widgets import Input

from dmqn_core.data.prepared import RAW_ID_RANGE


class UserSearch(Input):
    BINDINGS = [Binding("escape", "close", "cancel", show=False)]

    class Chosen(Message):
        """The user typed a user id and pressed Enter."""

        def __init__(self, user_id: int) -> None:
            super().__init__()
            self.user_id = user_id

    class Rejected(Message):
        """The user typed an id that cannot be one (beyond 64 bits); ``reason`` says so."""

        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    class Closed(Message):
        """The search was closed, whether a user was chosen or not."""

    def __init__(self, **kwargs) -> None:
        super().__init__(placeholder="raw user id", type="integer", validate_on=["submitted"], **kwargs)
        self.border_title = "user: Enter loads, Esc cancels, → completes a recorded one"

    def suggest_users(self, user_ids: list[int]) -> None:
        self.suggester = SuggestFromList([str(user_id) for user_id in user_ids])

    def open(self) -> None:
        self.value = ""
        self.display = True
        self.focus()

    def action_close(self) -> None:
        self.display = False
        self.post_message(self.Closed())

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            user_id = int(event.value)
        except ValueError:  # empty, or a lone sign: nothing to look up
            pass
        else:
            if user_id in RAW_ID_RANGE:
                self.post_message(self.Chosen(user_id))
            else:
                self.post_message(self.Rejected(f"user id {user_id} is outside the 64-bit range of ids"))
        self.action_close()
