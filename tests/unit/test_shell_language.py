"""The shell language: grammar coverage, evaluation, output formatting, and parser robustness."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.errors import ParseError, UserError
from mailgate.manage.cmdlets import Param, cmdlet, registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import to_str
from mailgate.manage.present import Record
from mailgate.shell.parser import is_incomplete, parse
from mailgate.shell.session import Shell

# A probe cmdlet that echoes how its parameters were bound, so syntax can be checked without a store.
if "Test-Binding" not in registry:
    @cmdlet("Test-Binding", [Param("Identity", position=0, from_pipeline=True, raw=True), Param("Name", convert=to_str),
                             Param("RemoteIPRanges", raw=True, multi=True), Param("Bindings", raw=True),
                             Param("Enabled", raw=True), Param("Switchy", switch=True), Param("Value", raw=True),
                             Param("RequireTLS", raw=True)],
            mutates=True)
    def _test_binding(ctx, args):
        return [Record("Bound", {k: v for k, v in args.items()})]


class _Home:
    server = "EX01"
    path = "/nonexistent"


def run(text: str) -> tuple[bool, str, str]:
    ctx = ManagementContext(_Home(), store=None, runtime=None)  # type: ignore[arg-type]
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(ctx, out=out, err=err)
    ok = shell.run_text(text)
    return ok, out.getvalue(), err.getvalue()


def bound(text: str) -> Record:
    ctx = ManagementContext(_Home(), store=None, runtime=None)  # type: ignore[arg-type]
    captured: list = []
    shell = Shell(ctx, out=io.StringIO(), err=io.StringIO())
    shell.evaluator.emit = captured.extend
    assert shell.run_text(text), shell.err.getvalue()
    records = [r for r in captured if isinstance(r, Record)]
    return records[-1]


def test_backtick_continuation_quotes_and_switches():
    r = bound('Test-Binding "Internal Relay" `\n  -Bindings 0.0.0.0:25 `\n  -RemoteIPRanges 192.168.0.0/24,10.0.0.1 `\n'
              "  -Switchy -Enabled $true -Name 'it''s'")
    assert r["Identity"] == "Internal Relay" and r["Bindings"] == "0.0.0.0:25"
    assert r["RemoteIPRanges"] == ["192.168.0.0/24", "10.0.0.1"]
    assert r["Switchy"] is True and r["Enabled"] is True and r["Name"] == "it's"


def test_parameter_prefixes_colon_values_and_arrays():
    r = bound('Test-Binding -Rem @("a", "b") -Swi:$false -Val $null -Ident x')
    assert r["Identity"] == "x"
    assert r["RemoteIPRanges"] == ["a", "b"] and r["Switchy"] is False and r["Value"] is None


def test_hashtable_for_multivalued_changes():
    r = bound('Test-Binding x -RemoteIPRanges @{Add="10.0.0.1","10.0.0.2"; Remove="192.168.0.1"}')
    change = r["RemoteIPRanges"]
    assert change["Add"] == ["10.0.0.1", "10.0.0.2"] and change["remove"] == "192.168.0.1"


def test_variables_subexpressions_and_string_expansion():
    r = bound('$c = @{Issuer="CN=CA"; Subject="CN=mail"}\nTest-Binding x -Name "<I>$($c.Issuer)<S>$($c.Subject)"')
    assert r["Name"] == "<I>CN=CA<S>CN=mail"
    r = bound('$n = 5; Test-Binding x -Value ($n * 2 + 1) -Name "n=$n`t!"')
    assert r["Value"] == 11 and r["Name"] == "n=5\t!"


def test_assignment_to_variables_properties_and_items_with_compound_operators():
    r = bound('$n = 5; $n += 2; $n *= 3; $n -= 1; $n /= 4\n$s = "a"; $s += "b"\n'
              '$list = @(); $list += "x"; $list += "y", "z"; $list[0] = "first"; $list[-1] = "last"\n'
              '$t = @{Add="1"}; $t.Remove = "2"; $t["Add"] += "3"\n'
              'Test-Binding x -Value $n -Name $s -RemoteIPRanges $list -Enabled $t')
    assert r["Value"] == 5 and r["Name"] == "ab"
    assert r["RemoteIPRanges"] == ["first", "y", "last"]
    assert r["Enabled"]["add"] == "13" and r["Enabled"]["Remove"] == "2"
    record = bound('$r = Test-Binding x -Name old -Value (1); $r.Name = "new"; $r.Value += 3; $r')
    assert record["Name"] == "new" and record["Value"] == 4


@pytest.mark.parametrize("text, expected", [
    ('"x" = 1', "The assignment expression is not valid"),
    ('$l = 1, 2; $l[5] = 0', "Index was outside the bounds of the array"),
    ('$n = 5; $n.Name = 1', "The property 'Name' cannot be found on this object"),
    ('$n = "a"; $n -= 1', 'Operator "-" can\'t be applied to "a" and "1"'),
    ('$true = 1', "Cannot overwrite variable true"),
])
def test_assignments_that_cannot_be_made_are_clear_errors(text, expected):
    ok, _, err = run(text)
    assert not ok and expected in err, err


def test_foreach_and_if_statements(tmp_path):
    ok, out, err = run('$total = 0\nforeach ($n in 1..4) {\n  if ($n % 2 -eq 0) { $total += $n; "even $n" }\n'
                       '  elseif ($n -eq 1) { "one" }\n  else { "odd $n" }\n}\n"total $total"\n'
                       'if (@()) { "never" }\nforeach ($x in @()) { "never" }\nif ($null) { "never" } else { "else" }')
    assert ok, err
    assert out.split("\n")[:6] == ["one", "even 2", "odd 3", "even 4", "total 6", "else"]
    assert "never" not in out
    # A failing statement in a loop is reported and the loop goes on, as PowerShell's non-terminating errors do.
    ok, out, err = run('foreach ($v in "a", "b", "c") { if ($v -eq "b") { Get-Date -Date "not a date" }; "after $v" }')
    assert not ok and out.split() == ["after", "a", "after", "b", "after", "c"]
    assert err.count("parameter 'Date'") == 1
    # foreach alone is still ForEach-Object's alias in a pipeline.
    ok, out, err = run('1, 2 | foreach { $_ * 10 }')
    assert ok and out.split() == ["10", "20"], err


# A cmdlet that reports an error and goes on (as Exchange's Get-* do for an identity that isn't there).
if "Test-Error" not in registry:
    @cmdlet("Test-Error", [Param("Identity", position=0, mandatory=True, convert=to_str)])
    def _test_error(ctx, args):
        ctx.warn(f"about {args['Identity']}")
        raise UserError(f"The object '{args['Identity']}' couldn't be found.", target=args["Identity"])


def test_error_action_try_catch_finally_and_throw():
    ok, out, err = run('Test-Error a -ErrorAction SilentlyContinue -WarningAction SilentlyContinue; "after a"\n'
                       'try { Test-Error b; "after b" } catch { "caught b" }\n'
                       'try { Test-Error c -ea Stop; "not run" } catch { "caught: $($_.Exception.Message)" } '
                       'finally { "finally c" }\n'
                       'try { Test-Binding x -NoSuch 1 } catch [System.Management.Automation.ParameterBindingException] '
                       '{ "binding: $_" }\n'
                       'try { throw "own reason" } catch { "thrown: $_" }\n'
                       'try { try { 1 / 0 } finally { "inner finally" } } catch { "outer: $_" }\n'
                       '"end"')
    lines = [line for line in out.split("\n") if line and not line.startswith("WARNING:")]
    assert lines == [
        "after a", "after b", "caught: The object 'c' couldn't be found.", "finally c",
        "binding: A parameter cannot be found that matches parameter name 'NoSuch'.", "thrown: own reason",
        "inner finally", "outer: Attempted to divide by zero.", "end"], (out, err)
    # Errors not caught: b's is shown (it went on), a's was silenced; the warnings likewise.
    assert "object 'b'" in err and "object 'a'" not in err and "about b" in out and "about a" not in out
    assert not ok


def test_error_action_stop_ends_the_script_unless_caught():
    ok, out, err = run('"one"\nTest-Error x -ErrorAction Stop -WarningAction Ignore\n"not run"')
    assert not ok and out.split() == ["one"] and "object 'x'" in err
    ok, out, err = run('$ErrorActionPreference = "Stop"\nforeach ($i in 1..3) { "item $i"; Test-Error $i }\n"not run"')
    assert not ok and out.split("\n")[0] == "item 1" and "not run" not in out and "item 2" not in out
    ok, out, err = run('throw "halt"\n"not run"')
    assert not ok and "halt" in err and "not run" not in out
    ok, _, err = run('Test-Error x -ErrorAction Sometimes')
    assert not ok and 'Cannot convert value "Sometimes" to type "System.Management.Automation.ActionPreference"' in err


def test_get_content_and_import_csv_read_files_for_loops(tmp_path):
    (tmp_path / "ips.txt").write_text("\ufeff10.0.0.1\r\n10.0.0.2\n")
    (tmp_path / "rows.csv").write_text('#TYPE Selected.Object\nName,Size\n"big, one",5\nsmall\n')
    ok, out, err = run(f'$ips = Get-Content {tmp_path / "ips.txt"}; $ips.Count; $ips -join "+"\n'
                       f'(gc {tmp_path / "ips.txt"} -Raw).Length\n'
                       f'foreach ($row in Import-Csv {tmp_path / "rows.csv"}) {{ "[$($row.Name)|$($row.Size)]" }}\n'
                       f'(Import-Csv {tmp_path / "rows.csv"} -Header A,B | Select-Object -First 1).B')
    assert ok, err
    assert out.split("\n")[:6] == ["2", "10.0.0.1+10.0.0.2", "19", "[big, one|5]", "[small|]", "Size"]
    ok, _, err = run(f'Get-Content {tmp_path / "missing.txt"}')
    assert not ok and "No such file or directory" in err


def test_file_cmdlets_take_windows_powershell_parameters_and_encodings(tmp_path):
    """What administrators' report one-liners add: -Encoding (with 5.1's meanings), -Append, -NoClobber,
    -Tail, Export-Csv as 5.1 writes it, and Import-Csv reading an Exchange log by its #Fields: line."""
    csv_path, text_path = tmp_path / "report.csv", tmp_path / "notes.txt"
    rows = "[pscustomobject]@{Name='a, \"b\"'; Count=1; Note=$null}, [pscustomobject]@{Name='c'; Count=2; Note='x'}"
    ok, _, err = run(f'{rows} | Export-Csv {csv_path} -NoTypeInformation -Encoding UTF8\n'
                     f'[pscustomobject]@{{Name="d"; Count=3; Note="y"}} | Export-Csv {csv_path} -Append')
    assert ok, err
    data = csv_path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and data.count(b"\xef\xbb\xbf") == 1   # UTF8 is 5.1's, with a mark
    assert data[3:].decode().splitlines() == ['"Name","Count","Note"', '"a, ""b""","1",', '"c","2","x"', '"d","3","y"']
    ok, out, err = run(f'(Import-Csv {csv_path} | Where-Object {{ $_.Count -ge 2 }}).Name -join "+"')
    assert ok and out.strip() == "c+d", err
    ok, _, err = run(f'[pscustomobject]@{{Other=1}} | Export-Csv {csv_path} -Append')
    assert not ok and "does not have a property that corresponds to the following column: Name" in err
    assert csv_path.read_bytes() == data   # refused: the file is as it was

    ok, _, err = run(f'[pscustomobject]@{{Name="e"}} | Export-Csv {tmp_path / "typed.csv"}')
    assert ok and (tmp_path / "typed.csv").read_text().splitlines()[:2] == [
        "#TYPE System.Management.Automation.PSCustomObject", '"Name"'], err

    ok, out, err = run(f'"h\u00e9llo" | Out-File {text_path} -Encoding Unicode\n"two" | Out-File {text_path} -Append\n'
                       f'Get-Content {text_path}\n"x" | Out-File {text_path} -NoClobber')
    assert not ok and "already exists" in err
    assert text_path.read_bytes() == "\ufeffh\u00e9llo\ntwo\n".encode("utf-16-le")   # the append stayed UTF-16
    assert out.splitlines() == ["h\u00e9llo", "two"]
    ok, out, err = run(f'"h\u00e9llo" | Out-File {text_path} -Encoding ascii; Get-Content {text_path}')
    assert ok and out.strip() == "h?llo", err
    ok, _, err = run(f'"x" | Out-File {text_path} -Encoding Latin9')
    assert not ok and "does not belong to the set" in err and text_path.read_bytes() == b"h?llo\n"

    ok, out, err = run(f'1..20 | Out-File {text_path}; (Get-Content {text_path} -Tail 3) -join ","; '
                       f'(Get-Content {text_path} -Head 2) -join ","')
    assert ok and out.split() == ["18,19,20", "1,2"], err
    ok, _, err = run('[pscustomobject]@{Identity="EX01\\Submission"; DeliveryType="Undefined"; MessageCount=0} | '
                     f'Out-File {text_path} -Width 30')
    title, dashes, row = text_path.read_text().splitlines()[1:4]
    assert ok, err   # titles and their dashes are cut to the columns' widths, like the values
    assert [len(w) for w in title.split()] == [len(w) for w in dashes.split()] and len(dashes) <= 31
    assert title.split()[1].endswith("...") and row.split()[0].endswith("...") and len(row) <= len(dashes)

    log = tmp_path / "RECV2026120514-1.LOG"
    log.write_text("#Software: Microsoft Exchange Server\n#Version: 15.0.0.0\n#Log-type: SMTP Receive Protocol Log\n"
                   "#Fields: date-time,connector-id,session-id,event\n2026-12-05T14:00:00.000Z,EX01\\Default,08DE1,+\n")
    ok, out, err = run(f"(Import-Csv {log}).'session-id'")
    assert ok and out.strip() == "08DE1", err


def test_report_rows_and_get_member_name_their_types():
    ok, out, err = run('$row = [pscustomobject]@{"date-time" = "t1"; Name = "n"}; $row."date-time" = "t2"\n'
                       "$row.'date-time'; (New-Object PSObject -Property @{A = 1}).A; \"2\" -ge 10\n"
                       '$row | Get-Member; "x" | Get-Member')
    assert ok, err
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[:3] == ["t2", "1", "True"]   # "2" -ge 10 compares text, as PowerShell does
    assert "   TypeName: System.Management.Automation.PSCustomObject" in lines
    assert "   TypeName: System.String" in lines and any(line.startswith("Length") for line in lines)


def test_smart_quotes_from_copied_documents():
    r = bound("Test-Binding \u201cInternal Relay\u201d -Name \u2018x\u2019")
    assert r["Identity"] == "Internal Relay" and r["Name"] == "x"


def test_positional_pipeline_and_where_sort_select_measure():
    ok, out, err = run('1,5,3 | Sort-Object -Descending | Select-Object -First 2')
    assert ok and out.split() == ["5", "3"]
    ok, out, _ = run('"a","bb","ccc" | Where-Object { $_.Length -gt 1 } | Measure-Object | fl Count')
    assert ok and "Count : 2" in out
    ok, out, _ = run('"x","y" | ForEach-Object { $_.ToUpper() }')
    assert out.split() == ["X", "Y"]


def test_where_object_simplified_syntax_on_records():
    ok, out, _ = run('@(@{Severity="Error"; Rule="a"}, @{Severity="Info"; Rule="b"}) | Where-Object Severity -eq Error '
                     '| ForEach-Object { $_.Rule }')
    assert ok and out.split() == ["a"]


def test_comparisons_follow_powershell():
    ok, out, _ = run('"ABC" -eq "abc"; "abc" -ceq "ABC"; 10 -gt "9"; "mail.contoso.com" -like "*.CONTOSO.com";'
                     ' @(1,2,3) -contains 2; 2 -in @(1,2); -not $false; "x" -match "^X$"')
    assert out.split() == ["True", "False", "True", "True", "True", "True", "True", "True"]


def test_get_date_methods_and_static_members():
    ok, out, err = run("(Get-Date).AddMinutes(-5) -lt (Get-Date); [datetime]::Now -gt (Get-Date).AddDays(-1)")
    assert ok, err
    assert out.split() == ["True", "True"]


def test_whatif_reports_and_changes_nothing():
    ok, out, _ = run("Test-Binding x -WhatIf")
    assert ok


def test_format_table_and_list_output():
    ok, out, _ = run('@{Name="Default Frontend EX01"; Bindings=@("[::]:25","0.0.0.0:25")} | ft Name,Bindings')
    lines = out.strip("\n").splitlines()
    assert lines[0].split() == ["Name", "Bindings"] and lines[1].split() == ["----", "--------"]
    assert lines[2] == "Default Frontend EX01 {[::]:25, 0.0.0.0:25}"
    ok, out, _ = run('@{Name="x"; RemoteIPRanges=@("a","b","c","d","e")} | fl Name,RemoteIPRanges')
    assert "Name           : x" in out and "RemoteIPRanges : {a, b, c, d...}" in out
    ok, out, _ = run('$FormatEnumerationLimit = -1; @{R=@("a","b","c","d","e")} | fl R')
    assert "R : {a, b, c, d, e}" in out
    # A named property the object lacks: Format-List leaves it out, Format-Table shows an empty column.
    ok, out, _ = run('@{Name="x"; Enabled=$true} | fl Name,Bogus,Enabled')
    assert ok and [line for line in out.splitlines() if line] == ["Name    : x", "Enabled : True"]
    ok, out, _ = run('@{Name="x"} | ft Name,Bogus')
    assert out.strip("\n").splitlines()[0].split() == ["Name", "Bogus"]
    # Text and numbers have no properties to list: Format-List prints them as themselves (it printed nothing).
    ok, out, _ = run('"hello", 5 | fl')
    assert ok and out.split() == ["hello", "5"]


def test_a_record_inside_a_list_prints_as_its_text_also_after_the_control_socket():
    from mailgate.control import decode, encode

    info = Record("RecipientInfo", {"Address": "a@x.example", "Status": "Retry"}, text="a@x.example;Retry;1;")
    message = Record("Message", {"Identity": "EX01\\x.example\\7", "Recipients": [info]})
    shell_side = decode(json_roundtrip(encode([message])))[0]
    assert str(shell_side["Recipients"][0]) == "a@x.example;Retry;1;"
    assert shell_side["Recipients"][0]["Status"] == "Retry"
    assert str(Record("Message", {"Identity": "EX01\\Submission\\1"})) == "EX01\\Submission\\1"


def json_roundtrip(value):
    import json

    return json.loads(json.dumps(value))


def test_errors_name_the_problem_and_fail_the_script():
    ok, _, err = run("Test-Binding x -Nope 1")
    assert not ok and "A parameter cannot be found that matches parameter name 'Nope'" in err
    ok, _, err = run("Test-Binding x -Re 1")
    assert not ok and "ambiguous" in err and "-RemoteIPRanges -RequireTLS" in err
    ok, _, err = run("Get-Nothing")
    assert not ok and "is not recognized as the name of a cmdlet" in err
    ok, _, err = run("Test-Binding x y")
    assert not ok and "positional parameter cannot be found" in err
    ok, _, err = run("Test-Binding -Name")
    assert not ok and "Missing an argument for parameter 'Name'" in err
    ok, _, err = run('Test-Binding x -Name "unterminated')
    assert not ok and "At line:1" in err


def test_script_continues_after_an_error_but_reports_failure():
    ok, out, err = run('Write-Output "before"\nGet-Nothing\nWrite-Output "after"')
    assert not ok and out.split() == ["before", "after"]


def test_incomplete_input_detection():
    assert is_incomplete("Get-Queue |")
    assert is_incomplete("New-ReceiveConnector -Name x `")
    assert is_incomplete('Set-X "open')
    assert is_incomplete("Get-X | Where-Object {")
    assert not is_incomplete("Get-Queue")


def test_get_command_and_help():
    ok, out, _ = run("Get-Command *-ReceiveConnector")
    assert ok and "New-ReceiveConnector" in out and "Set-ReceiveConnector" in out
    ok, out, err = run("(Get-Command Send-*,Resolve-* | % Name) -join ','; (Get-Command -Verb Retry,Suspend).Count")
    assert ok and out.split() == ["Resolve-DnsName,Send-MailMessage", "3"], err
    ok, out, _ = run("Get-Help New-ReceiveConnector -Full")
    assert ok and "-RemoteIPRanges" in out and "EXAMPLES" in out


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("$@(){}[]|;,`'\"-=.:*?%!#<>+/ \n\tabcXYZ019\u201c\u201d")), max_size=60))
def test_parser_never_crashes(text):
    try:
        parse(text)
    except ParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_shell_never_crashes_on_any_text(text):
    run(text)  # errors are reported, never raised


def test_parse_error_message_points_at_the_column():
    with pytest.raises(ParseError) as info:
        parse("Get-Queue | | ft")
    assert "char:" in info.value.message


def test_a_cmdlet_that_raises_is_reported_and_the_session_goes_on():
    """An unexpected exception inside a cmdlet (here: no configuration store at all) is an error record, not a
    crash of the shell; the next statement still runs."""
    ok, out, err = run('Set-TransportService\nWrite-Output "still here"')
    assert not ok
    assert "Set-TransportService failed with an internal error (AttributeError" in err
    assert "still here" in out


@pytest.mark.parametrize("nested", [
    "(" * 3000 + "1" + ")" * 3000,                                        # brackets
    "@(" * 3000 + "1" + ")" * 3000,                                       # array subexpressions
    "1 | ForEach-Object " + "{ 1 | ForEach-Object " * 400 + "{ $_ }" + " }" * 400,   # script blocks
])
def test_input_nested_thousands_deep_is_a_clear_error_and_the_session_goes_on(nested):
    ok, out, err = run(f"$a = {nested}\n'still here'")
    assert not ok and "nested too deeply" in err and "Traceback" not in err and "RecursionError" not in err
    assert "still here" in out


def test_the_range_operator():
    ok, out, err = run('1..3 | ForEach-Object { $_ * 2 }\n$x = 5..1; "$($x.Count) $($x[0]) $($x[4])"\n'
                       '(1..2+3).Count\n$n = 2; 1..$n | % { "m$_" }')
    assert ok, err
    assert out.split() == ["2", "4", "6", "5", "5", "1", "3", "m1", "m2"]
    ok, out, err = run("1..10000000")
    assert not ok and "too large" in err
    ok, out, err = run('"a"..2')
    assert not ok and 'Cannot convert "a"' in err


def test_a_negative_number_is_an_argument_and_a_dash_word_a_parameter():
    assert bound("Test-Binding -Value -1").get("Value") == "-1"
    assert bound("Test-Binding x -Value -2.5MB").get("Value") == "-2.5MB"
    ok, out, err = run("Write-Output -1\n1..2 | % { $_ -1 }")
    assert ok and out.split() == ["-1", "0", "1"], err
    ok, out, err = run("Test-Binding -Value -Name")
    assert not ok and "Missing an argument for parameter 'Value'" in err, err


def test_strings_and_arrays_repeat_with_the_multiplication_operator():
    ok, out, err = run('"ab" * 3\n(@(1, 2) * 2).Count\n"x" * 2.5\n"-" * 0\n"=" * "2"')
    assert ok, err
    assert out.split("\n")[:5] == ["ababab", "4", "xx", "", "=="]
    ok, out, err = run('"x" * 1e12\n"still here"')
    assert not ok and "more than 10,000,000 items" in err and "still here" in out
    ok, out, err = run('"x" * -1')
    assert not ok and "can't be repeated -1 times" in err
    ok, out, err = run('"x" * "y"')
    assert not ok and "whole number of times" in err


def test_group_object_and_script_block_properties():
    ok, out, err = run('@{a=1;b="p"},@{a=2;b="q"},@{a=1;b="r"} | Group-Object a | ForEach-Object { "$($_.Name):$($_.Count)" }\n'
                       '"x","X","y" | group -NoElement | % { "$($_.Name)=$($_.Count)" }\n'
                       '1..5 | Group-Object { $_ % 2 } | % { "$($_.Name)/$($_.Group -join \'\')" }\n'
                       '3,1,2 | Sort-Object { -$_ }')
    assert ok, err
    assert out.split() == ["1:2", "2:1", "x=2", "y=1", "1/135", "0/24", "3", "2", "1"]
    ok, out, err = run('"a","b","a" | Group-Object')
    assert ok and out.split()[:3] == ["Count", "Name", "Group"] and "{a, a}" in out


def test_join_split_and_replace():
    ok, out, err = run('@("a","b") -join ";"\n("a,b;c" -split "[,;]").Count\n'
                       '"Default Frontend EX01" -replace "frontend (\\w+)", "FE-$1"\n("A-B" -csplit "b").Count')
    assert ok, err
    assert out.split("\n")[:4] == ["a;b", "3", "Default FE-EX01", "1"]
    ok, out, err = run('"x" -split "("')
    assert not ok and "is not valid" in err


def test_wildcards_from_users_are_bounded():
    """Identities and -like patterns reach the shell from the API's clients too: a pattern without wildcards
    is compared as text (a 2 MB identity was compiled into a regular expression, seconds and gigabytes), and
    a wildcard pattern has a length limit."""
    from mailgate.manage.psvalues import _wildcard_regex, wildcard_match

    assert wildcard_match("Default*", "default frontend EX01") and not wildcard_match("Def?ult", "Default!")
    assert wildcard_match("[cd]efault", "Default") and not wildcard_match("a" * 2_000_000, "a")
    before = _wildcard_regex.cache_info().currsize
    assert wildcard_match("x" * 2_000_000, "x" * 2_000_000)
    assert _wildcard_regex.cache_info().currsize == before
    ok, out, err = run(f'"abc" -like "{"*a" * 600}"')
    assert not ok and "too long" in err
    ok, out, err = run('"abc" -like "a*"\n"ABC" -clike "a*"')
    assert ok and out.split() == ["True", "False"]


def test_a_script_block_as_a_string_is_its_code():
    ok, out, err = run('$b = { MessageCount -gt 0 }; "[$b]"\n"$({ 1 })".Length')
    assert ok, err
    assert out.split("\n")[:2] == ["[ MessageCount -gt 0 ]", "3"]


@pytest.mark.parametrize("command, expected", [
    ("Get-MessageTrackingLog -ResultSize 99999999999999999999", 'type "System.Int32". Error: "Value was either too large'),
    ("Get-MessageTrackingLog -InternalMessageId 99999999999999999999", "too large or too small for an Int64"),
    ("Get-Mailbox -ResultSize abc", 'Cannot convert value "abc" to type "System.Int32"'),
    ("Get-Queue -ResultSize 0", "ResultSize must be a positive number or Unlimited"),
])
def test_numbers_out_of_range_are_binding_errors_not_internal_ones(command, expected):
    ok, out, err = run(command)
    assert not ok and expected in err and "internal error" not in err and "ParameterBindingException" in err


def test_get_member_lists_properties():
    ok, out, err = run('@{Alpha=1; Beta="x"; Gamma=$true} | Get-Member | % { "$($_.Name)=$($_.Definition)" }\n'
                       '@{Alpha=1; Beta="x"} | gm B* | % Name')
    assert ok, err
    assert out.split() == ["Alpha=int", "Alpha", "{get;set;}", "Beta=string", "Beta", "{get;set;}", "Gamma=bool",
                           "Gamma", "{get;set;}", "Beta"]


def test_convert_to_json_writes_records_with_powershell_depth_and_array_rules(tmp_path):
    import json

    from helpers import make_home, shell

    home = make_home(tmp_path / "home")
    r = shell(home, "Get-AcceptedDomain | Select-Object Name,DomainType,Default | ConvertTo-Json", runtime=None)
    assert r.ok, r.err
    assert json.loads(r.out) == {"Name": "domain.com", "DomainType": "Authoritative", "Default": True}
    r = shell(home, "Get-ReceiveConnector | Select-Object Name,Bindings | ConvertTo-Json -Compress", runtime=None)
    connectors = json.loads(r.out)
    assert isinstance(connectors, list) and len(connectors) == 2 and "\n" not in r.out.strip()
    assert {"[::]:25", "0.0.0.0:25"} == set(next(c for c in connectors if c["Name"].startswith("Default"))["Bindings"])
    r = shell(home, "@{a=@{b=@{c=1}}} | ConvertTo-Json -Depth 1 -Compress; 'x' | ConvertTo-Json -AsArray -Compress",
              runtime=None)
    assert r.out.split() == ['{"a":{"b":"System.Collections.Hashtable"}}', '["x"]']
    r = shell(home, "1 | ConvertTo-Json -Depth 101", runtime=None)
    assert not r.ok and "Depth" in r.err


def test_exchange_2010_names_of_the_transport_service_cmdlets_still_run_with_a_warning(tmp_path):
    from helpers import make_home, shell

    home = make_home(tmp_path / "home")
    r = shell(home, "Set-TransportServer EX01 -MessageRetryInterval 00:02:00; Get-TransportServer | fl Name,MessageRetryInterval",
              runtime=None)
    assert r.ok, r.err
    assert "MessageRetryInterval : 00:02:00" in r.out
    assert "The Get-TransportServer cmdlet will be removed in a future version of Exchange. Use the " \
           "Get-TransportService cmdlet instead." in r.err + r.out
    assert "Set-TransportServer cmdlet will be removed" in r.err + r.out


def test_identity_takes_one_object_a_list_is_a_binding_error_and_a_pipeline_runs_once_per_object(tmp_path):
    from helpers import make_home, shell

    home = make_home(tmp_path / "home")
    r = shell(home, 'Get-ReceiveConnector -Identity "Default Frontend EX01","Client Frontend EX01"', runtime=None)
    assert not r.ok and "parameter 'Identity'" in r.err and "internal error" not in r.err
    r = shell(home, 'Get-ReceiveConnector -Identity @("Default Frontend EX01") | ft Name', runtime=None)
    assert r.ok and "Default Frontend EX01" in r.out
    r = shell(home, '"Default Frontend EX01","Client Frontend EX01" | Get-ReceiveConnector | ft Name', runtime=None)
    assert r.ok and "Default Frontend EX01" in r.out and "Client Frontend EX01" in r.out


def test_a_credential_lists_its_user_name_and_never_its_password():
    ok, out, err = run('$c = New-Object System.Management.Automation.PSCredential("relay@contoso.com", '
                       '(ConvertTo-SecureString "S3cret!" -AsPlainText -Force)); $c | fl; $c.UserName; $c')
    assert ok, err
    assert "UserName : relay@contoso.com" in out and "Password : System.Security.SecureString" in out, out
    assert "\nrelay@contoso.com\n" in out and "System.Management.Automation.PSCredential" in out, out
    assert "S3cret!" not in out


def test_records_with_the_same_properties_share_their_index_and_a_new_property_stays_with_its_record():
    first, second = Record("T", {"Name": "a", "Count": 1}), Record("T", {"Name": "b", "Count": 2})
    assert first._index is second._index          # 100,000 tracking events keep one index, not 100,000
    first.set("Added", True)
    first.set("count", 5)
    assert first.get("added") is True and first.get("COUNT") == 5 and first.keys() == ["Name", "Count", "Added"]
    assert not second.has("Added") and second.get("count") == 2 and second.keys() == ["Name", "Count"]
    assert Record("T", {"Name": "c", "Count": 3}).keys() == ["Name", "Count"]


def test_a_file_that_cant_be_written_and_a_date_that_isnt_one_are_clear_errors_not_bugs(tmp_path):
    missing = tmp_path / "no-such-dir" / "out.txt"
    for command, expected in [(f'"x" | Out-File {missing}', f"No such file or directory: '{missing}'"),
                              ('"x" | Export-Csv -Path ""', "No such file or directory: ''"),
                              ('"x" | Export-Csv ("x" * 5000)', "File name too long"),
                              ('Get-Date -Date ""', "parameter 'Date'. Cannot convert value \"\" to type"),
                              ("Get-Date -Date 1.5", "parameter 'Date'")]:
        ok, out, err = run(command + '\n"still here"')
        assert not ok and expected in err and "This is a bug" not in err, (command, err)
        assert "still here" in out
    ok, out, err = run('Get-Date "2026-01-02 03:04:05" -Format "yyyy-MM-dd"')
    assert ok and out.strip() == "2026-01-02", err


@pytest.mark.parametrize("text,expected", [
    ('"x" * 1e400', "whole number of times"),
    ("[int]1e400", 'Cannot convert value "inf" to type "int"'),
    ('[int]"1e400"', 'Cannot convert value "1e400" to type "int"'),
    ('[long]"nan"', 'Cannot convert value "nan" to type "long"'),
    ("1e400 .. 1e400", 'Cannot convert "inf" to an integer for the range operator'),
])
def test_numbers_too_large_for_their_use_are_errors_and_the_session_goes_on(text, expected):
    ok, out, err = run(text + '\n"still here"')
    assert not ok and expected in err and "Traceback" not in err, err
    assert "still here" in out


# Expressions from values and operators at their edges: a number too large, a bad pattern, a width or an index
# no string can have. Whatever they combine to, the answer is a value or a clear error, never an internal one.
EDGE_VALUES = ["1e400", "-1", "0", "0x7fffffffffffffff", "2147483648", "1.5", "1MB", "'a'", '"b"', "'('", "@()",
               "@(1,2)", "@{a=1}", "$null", "$true", "(Get-Date)", "[int]", "[long]", "[string]", "[datetime]",
               "[timespan]", "[bool]", "[double]", "1..3", "'{0}{1}'", "'{99999999999}'", "(1,2)[99999999999]",
               "'abc'.Substring(5)", "'a'.PadLeft(99999999999)", "(Get-Date).AddDays(1e400)",
               "(Get-Date).AddYears(99999)", "[char]99999999", "$v", "$v.Name", "$v[0]", "$h.Keys"]
EDGE_OPERATORS = ["+", "-", "*", "/", "%", "-join", "-split", "-replace", "-eq", "-like", "-match", "-gt", "-and",
                  "-not", ",", "..", "-contains", "-in", "-f", "-bor", "=", "+=", "-=", "*=", "/=", "%=", "throw",
                  "try {", "} catch {", "}", "-ErrorAction Stop", "-ea", "SilentlyContinue"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(EDGE_VALUES + EDGE_OPERATORS), min_size=1, max_size=6))
def test_expressions_at_the_edges_are_values_or_clear_errors(tokens):
    text = "$v = @(1, 'a'); $h = @{a=1}\n" + " ".join(tokens)
    ok, out, err = run(text)
    assert "internal error" not in err, (text, err)


def test_selected_properties_are_shown_by_themselves_and_flags_enums_as_text(tmp_path):
    """Select-Object makes objects with no formatting view of their own: five properties or more are a list
    (they were drawn in Get-ReceiveConnector's table view, three columns of which four were empty), fewer a
    table; a flags enum such as PermissionGroups is text, aligned left (it was right-aligned, as numbers are)."""
    from helpers import make_home, shell

    home = make_home(tmp_path / "home")
    r = shell(home, 'Get-ReceiveConnector "Default Frontend EX01" | Select Name,PermissionGroups,AuthMechanism,'
                    'MaxInboundConnectionPerSource,Enabled', runtime=None)
    assert r.ok, r.err
    lines = [line for line in r.out.splitlines() if line.strip()]
    assert lines[0] == "Name                          : Default Frontend EX01"
    assert lines[1] == "PermissionGroups              : AnonymousUsers, ExchangeServers, ExchangeLegacyServers"
    assert [line.split(":")[0].strip() for line in lines] == ["Name", "PermissionGroups", "AuthMechanism",
                                                              "MaxInboundConnectionPerSource", "Enabled"]
    r = shell(home, "Get-ReceiveConnector | Sort Name | Select Name,PermissionGroups,MaxInboundConnectionPerSource",
              runtime=None)
    lines = [line for line in r.out.splitlines() if line.strip()]
    assert lines[0].split() == ["Name", "PermissionGroups", "MaxInboundConnectionPerSource"]
    assert lines[0].index("PermissionGroups") == lines[2].index("ExchangeUsers") == len("Default Frontend EX01 ")
    assert lines[3].index("AnonymousUsers") == len("Default Frontend EX01 ")
    r = shell(home, 'Get-ReceiveConnector "Client Frontend EX01" | Select Name,Enabled | Get-Member', runtime=None)
    assert [line.split()[0] for line in r.out.splitlines() if "Property" in line] == ["Name", "Enabled"]


def test_the_format_operator_as_exchange_scripts_use_it():
    """``"{0}: {1:N0}" -f $q.Identity, $q.MessageCount`` — the way Exchange administrators build report lines
    (it was a parse error). -f binds tighter than + and looser than the comma."""
    ok, out, err = run('"{0,-6}|{1,10:N0}|{2:P1}|{3:X4}|{4:D3}|{{x}}" -f "ab", 1234567, 0.256, 255, 7\n'
                       '"n=" + "{0:0.00}" -f 3.14159\n'
                       '"{0:yyyy-MM-dd HH:mm:ss.fff}" -f (Get-Date "2026-12-05 13:04:05")\n'
                       '(Get-Date "2026-12-05 13:04:05").ToString("dd MMM yyyy hh:mm tt")\n'
                       '"{1}{0}" -f "b", "a"')
    assert ok, err
    assert out.splitlines() == ["ab    | 1,234,567|25.6 %|00FF|007|{x}", "n=3.14", "2026-12-05 13:04:05.000",
                                "05 Dec 2026 01:04 PM", "ab"]
    for bad in ('"{0}{1}" -f 1', '"{0" -f 1', '"{0:Q}" -f 5', '"{0,99999999}" -f 1'):
        ok, out, err = run(bad)
        assert not ok and "Error formatting a string" in err and out == "", bad


def test_loops_break_continue_and_increments():
    """for, while, do-while/until, break and continue, $i++ — as Exchange administrators' scripts use them (each
    was a parse error)."""
    ok, out, err = run('for ($i = 1; $i -le 3; $i++) { "i=$i" }\n'
                       '$n = 0; while ($n -lt 3) { $n++ }; "n=$n"\n'
                       '$m = 10\ndo { $m-- } until ($m -le 7)\n"m=$m"\n'
                       'do { ++$m }\nwhile ($m -lt 9)\n"m=$m"\n'
                       'foreach ($a in 1..6) { if ($a -eq 2) { continue }; if ($a -eq 5) { break }; "a=$a" }\n'
                       'for (;;) { $k++; foreach ($x in 1..3) { break }; if ($k -ge 4) { break } }; "k=$k"\n'
                       'do { "once" } while ($false)')
    assert ok, err
    assert out.split() == ["i=1", "i=2", "i=3", "n=3", "m=7", "m=9", "a=1", "a=3", "a=4", "k=4", "once"]
    ok, out, err = run('"before"; foreach ($a in 1..3) { "a=$a" }; break; "after"\n"not reached"')
    assert out.split() == ["before", "a=1", "a=2", "a=3"] and err == ""
    assert not run("$i++ +")[0] and "1" == run("$z++; $z")[1].strip()


def test_write_warning_verbose_error_and_the_error_variable():
    """Write-Warning/-Verbose/-Error as scripts use them, and $Error (newest first, also what -ErrorAction
    SilentlyContinue kept quiet); Write-Error doesn't stop the script unless -ErrorAction Stop."""
    ok, out, err = run('Write-Warning "careful"; Write-Verbose "quiet"; Write-Verbose "loud" -Verbose\n'
                       '$VerbosePreference = "Continue"; Write-Verbose "asked"\n'
                       'Write-Error "first"\n"count=$($Error.Count)"\n'
                       'Write-Error "second" -ErrorAction SilentlyContinue\n'
                       '"count=$($Error.Count) newest=$($Error[0]) oldest=$($Error[1].Exception.Message)"\n'
                       'try { Write-Error "stopped" -ErrorAction Stop; "not here" } catch { "caught $_" }')
    assert not ok   # Write-Error reported an error
    assert out.splitlines() == ["WARNING: careful", "VERBOSE: loud", "VERBOSE: asked", "count=1",
                                "count=2 newest=second oldest=first", "caught stopped"]
    assert err.count("Write-Error : first") == 1 and "second" not in err and "WriteErrorException" in err


def test_one_object_indexed_as_an_array_of_one():
    """``(Get-ExchangeCertificate)[0].Thumbprint`` with one certificate: one object indexed with [0] or [-1] is
    that object, as in PowerShell (it was $null, and Remove-ExchangeCertificate -Thumbprint $t then failed)."""
    ok, out, err = run('(Test-Binding "only one")[0].Identity\n(Test-Binding "only one")[-1].Identity\n'
                       '$n = 5; "$($n[0]) $($n[-1]) [$($n[1])]"\n(1, 2)[1]\n"abc"[1]')
    assert ok, err
    assert out.splitlines() == ["only one", "only one", "5 5 []", "2", "b"]


def test_help_names_parameter_types_as_exchange_does():
    """Get-Help's syntax lines showed Python's types (<bool>, <str | None>, <mailgate.config.values.TlsAuthLevel |
    None>); they show Exchange's (<Boolean>, <String>, <TlsAuthLevel>, <ByteQuantifiedSize>, <Unlimited>...)."""
    import importlib
    import pkgutil

    import mailgate.manage

    for module in pkgutil.iter_modules(mailgate.manage.__path__):
        importlib.import_module(f"mailgate.manage.{module.name}")
    leaked = {(cmd.name, p.name, p.type_name) for cmd in registry.all() for p in cmd.params
              if p.type_name in ("str", "bool", "int", "float", "ByteSize", "UnlimitedInt", "TimeSpan")
              or any(mark in p.type_name for mark in ("|", "mailgate.", "None", "typing"))}
    assert not leaked
    ok, out, err = run("Get-Help New-SendConnector")
    assert ok and "[-RequireTLS <Boolean>]" in out and "[-TlsAuthLevel <TlsAuthLevel>]" in out, err


def test_help_descriptions_read_as_text():
    """A description of several lines kept its docstring's indentation (every line after the first indented
    twice as far) and reST's ``quotes``."""
    ok, out, err = run("Get-Help Export-Csv")
    assert ok, err
    description = out.split("DESCRIPTION\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(description) > 1 and all(line.startswith("    ") and line[4] != " " for line in description), description
    assert "``" not in out and "a #TYPE line" in out


def test_resolve_dnsname_and_test_netconnection_troubleshoot_mail_flow():
    """The Windows cmdlets administrators reach for when mail doesn't flow: MX and address lookups (a missing
    name or record type said as Windows says it) and a TCP test of a port."""
    import socket

    from peers import DnsServer

    zone = DnsServer()
    listener = socket.create_server(("127.0.0.1", 0))
    closed_port = socket.create_server(("127.0.0.1", 0))
    free = closed_port.getsockname()[1]
    closed_port.close()
    try:
        zone.add("fabrikam.example", "MX", "20 mx2.fabrikam.example.", "10 mx1.fabrikam.example.")
        zone.add("mx1.fabrikam.example", "A", "127.0.0.20")
        server = f"-Server {zone.address}"
        ok, out, err = run(f"Resolve-DnsName fabrikam.example -Type MX {server} | Sort-Object Preference | "
                           f"% {{ \"$($_.NameExchange) $($_.Preference)\" }}\n"
                           f"(Resolve-DnsName mx1.fabrikam.example {server}).IPAddress\n"
                           f"(Resolve-DnsName fabrikam.example -Type TXT {server}).Section")
        assert ok, err
        assert out.split("\n")[:4] == ["mx1.fabrikam.example 10", "mx2.fabrikam.example 20", "127.0.0.20", "Authority"]
        ok, _, err = run(f"Resolve-DnsName nope.fabrikam.example {server}")
        assert not ok and "nope.fabrikam.example : DNS name does not exist" in err
        ok, _, err = run("Resolve-DnsName fabrikam.example -Server dns.example")
        assert not ok and "isn't a list of DNS server addresses" in err
        port = listener.getsockname()[1]
        ok, out, err = run(f"(tnc localhost -Port {port}).TcpTestSucceeded; "
                           f"Test-NetConnection 127.0.0.1 -Port {free} -InformationLevel Quiet")
        lines = out.split()
        assert ok and lines[0] == "True" and lines[-1] == "False", err
        assert f"WARNING: TCP connect to (127.0.0.1 : {free}) failed" in out
    finally:
        zone.close()
        listener.close()


def test_redirection_operators_and_convertto_html_as_exchange_documents_them(tmp_path, monkeypatch):
    """Get-MessageTrackingLog's documentation: "pipe the output to ConvertTo-Html or ConvertTo-Csv and add
    > <filename>". > and >> write what the command prints (as Out-File), 2>$null silences its errors (they stay in
    $Error), 2>&1 merges them into its output, 3> takes its warnings, *> all of them."""
    monkeypatch.chdir(tmp_path)
    rows = '[pscustomobject]@{Name="<a>"; Size=1}, [pscustomobject]@{Name="b"; Size=2}'
    ok, out, err = run(f'{rows} | ConvertTo-Html -Title Report > report.html\n'
                       f'{rows} | ConvertTo-Csv -NoTypeInformation > rows.csv\n"three" >> rows.csv\n'
                       'Test-Error gone 2>$null\n"after"\n$Error.Count\n'
                       'Test-Error merged 2>&1 | Out-File merged.txt\nTest-Error all *> all.txt\n'
                       'Test-Error warned 3> warnings.txt 2>$null')
    shown = [line for line in out.splitlines() if line.strip()]
    assert ok and shown == ["WARNING: about gone", "after", "1", "WARNING: about merged"], err   # 2> isn't 3>
    page = (tmp_path / "report.html").read_text()
    assert "<title>Report</title>" in page and "<tr><th>Name</th><th>Size</th></tr>" in page
    assert "<tr><td>&lt;a&gt;</td><td>1</td></tr>" in page
    assert (tmp_path / "rows.csv").read_text().splitlines() == ['"Name","Size"', '"<a>","1"', '"b","2"', "three"]
    assert (tmp_path / "merged.txt").read_text() == "Test-Error : The object 'merged' couldn't be found.\n"
    assert (tmp_path / "all.txt").read_text().splitlines() == ["Test-Error : The object 'all' couldn't be found.",
                                                               "WARNING: about all"]
    assert (tmp_path / "warnings.txt").read_text() == "WARNING: about warned\n"
    ok, _, err = run("Test-Error stop -ErrorAction Stop 2>$null\n\"not run\"")
    assert not ok and "The object 'stop' couldn't be found." in err   # a stopping error isn't redirected
    # Write-Host is for the screen, not output: not redirected, not assigned, not swallowed by Out-Null.
    ok, out, err = run(f'Write-Host "on screen" > {tmp_path / "host.txt"}\n$h = Write-Host a, b\n"[$h]"\n'
                       'Write-Host kept | Out-Null')
    assert ok and out.split("\n")[:4] == ["on screen", "a b", "[]", "kept"], err
    assert (tmp_path / "host.txt").read_text() == ""
    ok, out, err = run(f'"x" > {tmp_path / "missing" / "x.txt"}\n"after"')
    assert not ok and "No such file or directory" in err and "internal error" not in err and "after" in out
    ok, _, err = run("Get-Queue >")   # an error at once, not a continuation prompt waiting for the file
    assert not ok and "Missing file specification after redirection operator." in err
    assert not is_incomplete("Get-Queue >") and not is_incomplete("Get-Queue >> ") and is_incomplete("Get-Queue |")


def test_what_report_scripts_take_for_granted(tmp_path):
    """$env:COMPUTERNAME is the local server, .NET date formats (standard and custom), Sort-Object keys with their
    own direction, Test-Path, Read-Host, and Out-GridView saying what to use instead."""
    from mailgate.shell.session import LinePrompter

    ctx = ManagementContext(_Home(), store=None, runtime=None)  # type: ignore[arg-type]
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(ctx, out=out, err=err)
    ctx.prompter = LinePrompter(iter(["EX01\\Submission\n"]), err)
    rows = "[pscustomobject]@{N='b'; C=1}, [pscustomobject]@{N='a'; C=1}, [pscustomobject]@{N='c'; C=2}"
    assert shell.run_text(
        '$env:COMPUTERNAME\n$d = [datetime]::Parse("2026-03-07 14:05:09")\n'
        '$d.ToString("s"); $d.ToString("M/d/yyyy h:mm tt"); "{0:yyyyMMdd-HHmm}" -f $d; $d.ToString("dddd \'at\' H:mm")\n'
        f'({rows} | Sort-Object @{{Expression="C"; Descending=$true}}, N | % N) -join ","\n'
        f'Test-Path {tmp_path}; Test-Path {tmp_path / "none"}; Test-Path {tmp_path} -PathType Leaf\n'
        '$queue = Read-Host "Queue"; "[$queue]"'), err.getvalue()
    lines = [line for line in out.getvalue().splitlines() if line]
    assert lines == ["EX01", "2026-03-07T14:05:09", "3/7/2026 2:05 PM", "20260307-1405", "Saturday at 14:05", "c,a,b",
                     "True", "False", "False", "[EX01\\Submission]"]
    # Dates as Exchange's documentation writes them ("09/01/2018 5:00 PM") and as people do.
    ok, out_text, err_text = run('(Get-Date "09/01/2018 5:00 PM").ToString("s"); (Get-Date "Dec 4, 2026").Day; '
                                 '(Get-Date "4 December 2026 9:30 AM").Hour')
    assert ok and out_text.split() == ["2018-09-01T17:00:00", "4", "9"], err_text
    ok, out_text, err_text = run('Get-Date "12/5/2026 3:41:59 PM"\n(New-TimeSpan -Days 1 -Minutes 30).TotalMinutes\n'
                                 '(New-TimeSpan -Start "12/5/2026 1:00 PM" -End "12/5/2026 3:30 PM").TotalHours')
    assert ok and out_text.splitlines() == ["Saturday, December 5, 2026 3:41:59 PM", "1470", "2.5"], err_text
    ok, _, err_text = run("[pscustomobject]@{A=1} | Out-GridView")
    assert not ok and "Format-Table" in err_text and "Export-Csv" in err_text


def test_format_groupby_and_exclude_property_wildcards():
    rows = ("[pscustomobject]@{Role='Frontend'; Name='a'; WhenCreated=1; WhenChanged=2}, "
            "[pscustomobject]@{Role='Frontend'; Name='b'; WhenCreated=1; WhenChanged=2}, "
            "[pscustomobject]@{Role='Hub'; Name='c'; WhenCreated=1; WhenChanged=2}")
    ok, out, err = run(f"{rows} | Format-Table Name -GroupBy Role")
    lines = [line.rstrip() for line in out.splitlines() if line.strip()]
    assert ok and lines == ["   Role: Frontend", "Name", "----", "a", "b", "   Role: Hub", "Name", "----", "c"], err
    ok, out, err = run(f"({rows} | Select-Object * -ExcludeProperty When* | Select-Object -First 1 | "
                       "Get-Member | % Name) -join ','")
    assert ok and out.strip() == "Role,Name", err


def test_tab_completes_the_values_a_parameter_takes():
    """As Exchange's shell: -Usage <Tab> cycles through the usage types, a Boolean through $true/$false."""
    from prompt_toolkit.document import Document

    from mailgate.manage import load_cmdlets
    from mailgate.shell.session import CmdletCompleter

    load_cmdlets()   # as the shell does before it offers completions

    def offered(text: str) -> list[str]:
        return [c.text for c in CmdletCompleter().get_completions(Document(text), None)]

    assert offered("New-ReceiveConnector Relay -Usage In") == ["Internal", "Internet"]
    assert offered("Set-ReceiveConnector Relay -AuthMechanism ")[:2] == ["None", "Tls"]
    assert offered("Set-ReceiveConnector Relay -RequireTLS ") == ["$true", "$false"]
    assert offered("New-AcceptedDomain Fab -DomainName fabrikam.com -DomainType Int") == ["InternalRelay"]
    assert offered("Set-SendConnector Out -RequireTLS $true -TlsAuthLevel D") == ["DomainValidation"]
    assert offered("Get-Queue -Ident") == ["-Identity"]


def test_out_host_out_string_stream_and_tee_object(tmp_path):
    rows = "[pscustomobject]@{N='a'}, [pscustomobject]@{N='b'}"
    ok, out, err = run(f"{rows} | Tee-Object -Variable kept | Measure-Object | % Count; $kept.Count\n"
                       f"{rows} | Tee-Object {tmp_path / 'tee.txt'} | % N\n"
                       f"({rows} | Out-String -Stream).Count -gt 2\n"
                       f"$x = {rows} | Out-Host; $null -eq $x")
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert ok and lines[:5] == ["2", "2", "a", "b", "True"], err
    assert lines[5:] == ["N", "-", "a", "b", "True"]   # Out-Host printed the rows; nothing was left to assign
    assert (tmp_path / "tee.txt").read_text().split() == ["N", "-", "a", "b"]


def test_measure_object_adds_up_imported_text_as_numbers(tmp_path):
    """Import-Csv's values are text; Measure-Object -Sum reads them as numbers, as PowerShell (it said 0)."""
    (tmp_path / "sizes.csv").write_text('"Queue","Messages"\n"a","1"\n"b","4"\n"c","9"\n')
    ok, out, err = run(f"Import-Csv {tmp_path / 'sizes.csv'} | Measure-Object Messages -Sum -Maximum | "
                       "% {{ \"$($_.Sum) $($_.Maximum)\" }}".replace("{{", "{").replace("}}", "}"))
    assert ok and out.strip() == "14 9", err
    ok, _, err = run("[pscustomobject]@{X='abc'} | Measure-Object X -Sum")
    assert not ok and 'Input object "abc" is not numeric.' in err
