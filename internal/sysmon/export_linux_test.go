package sysmon

var Find = find
