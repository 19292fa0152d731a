"""What the tests share: real services started for them (:mod:`.services`), the event logs as they open them
(:mod:`.event_logs`), events and fixtures' data (:mod:`.factories`), waiting for what happens in the
background (:mod:`.eventually`), the CLI run as a user runs it (:mod:`.cli`), and helpers of one area each
(:mod:`.adapters`, :mod:`.rolling`, :mod:`.trained`, :mod:`.crashing`, :mod:`.upstream`)."""
