"""Small files shipped with wanbox (the demo's photo, see NOTICE); a package only so that installs carry them.

Must hold nothing that tests or jobs depend on besides `wanbox demo`'s example input.
"""
