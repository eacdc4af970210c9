"use strict";(self.rspackChunkrbee_jupyter=self.rspackChunkrbee_jupyter||[]).push([[700],{851(r,e,o){var a=o(126),t=o.n(a),n=o(719),i=(o.n(n))()(t());i.push([r.id,`/* rbee sidebar: JupyterLab theme variables only, so light and dark themes both work. */
.rbee-panel {
  background: var(--jp-layout-color1);
  color: var(--jp-ui-font-color1);
  font-family: var(--jp-ui-font-family);
  font-size: var(--jp-ui-font-size1);
  overflow-y: auto;
  padding: 0 8px 16px;
  min-width: 260px;
}
.rbee-header {
  display: flex;
  align-items: baseline;
  justify-content: space-between;
  border-bottom: var(--jp-border-width) solid var(--jp-border-color2);
}
.rbee-header h2 {
  font-size: var(--jp-ui-font-size3);
  margin: 8px 0;
}
.rbee-status { color: var(--jp-ui-font-color2); font-size: var(--jp-ui-font-size0); }
.rbee-status[data-ok='true'] { color: var(--jp-success-color1); }
.rbee-status[data-ok='false'] { color: var(--jp-warn-color1); }
.rbee-section { border-bottom: var(--jp-border-width) solid var(--jp-border-color2); padding: 4px 0 8px; }
.rbee-section-title {
  font-size: var(--jp-ui-font-size1);
  text-transform: uppercase;
  letter-spacing: 0.05em;
  color: var(--jp-ui-font-color2);
  margin: 8px 0 4px;
}
.rbee-list { list-style: none; margin: 0; padding: 0; }
.rbee-item { padding: 4px 0; border-top: var(--jp-border-width) solid var(--jp-border-color3); }
.rbee-item:first-child { border-top: none; }
.rbee-row { display: flex; align-items: center; gap: 6px; justify-content: space-between; flex-wrap: wrap; }
.rbee-name { font-weight: 600; overflow-wrap: anywhere; }
.rbee-detail { color: var(--jp-ui-font-color2); font-size: var(--jp-ui-font-size0); }
.rbee-actions { display: flex; gap: 4px; margin-left: auto; }
.rbee-empty { color: var(--jp-ui-font-color3); font-style: italic; margin: 4px 0; }
.rbee-button {
  font-size: var(--jp-ui-font-size0);
  padding: 2px 8px;
  min-height: 22px;
  border-radius: var(--jp-border-radius);
  border: var(--jp-border-width) solid var(--jp-border-color1);
  background: var(--jp-layout-color2);
  color: var(--jp-ui-font-color1);
  cursor: pointer;
}
.rbee-button.jp-mod-accept { background: var(--jp-brand-color1); border-color: var(--jp-brand-color1); color: var(--jp-ui-inverse-font-color1); }
.rbee-button.jp-mod-warn { border-color: var(--jp-warn-color1); color: var(--jp-warn-color1); background: transparent; }
.rbee-button:disabled { opacity: 0.5; cursor: default; }
.rbee-button:focus-visible, .rbee-panel input:focus-visible, .rbee-panel select:focus-visible,
.rbee-panel textarea:focus-visible {
  outline: 2px solid var(--jp-brand-color1);
  outline-offset: 1px;
}
.rbee-bar {
  height: 8px;
  margin: 4px 0 2px;
  background: var(--jp-layout-color3);
  border-radius: 4px;
  overflow: hidden;
}
.rbee-bar-fill { height: 100%; width: 0; background: var(--jp-brand-color1); transition: width 0.2s linear; }
.rbee-bar[data-state='ok'] .rbee-bar-fill { background: var(--jp-success-color1); }
.rbee-bar[data-state='error'] .rbee-bar-fill { background: var(--jp-error-color1); }
.rbee-bar[data-state='idle'] .rbee-bar-fill { background: var(--jp-info-color1); }
.rbee-badge {
  font-size: var(--jp-ui-font-size0);
  padding: 0 6px;
  border-radius: 8px;
  background: var(--jp-layout-color3);
}
.rbee-badge[data-state='idle'] { background: var(--jp-success-color1); color: var(--jp-ui-inverse-font-color1); }
.rbee-badge[data-state='busy'] { background: var(--jp-brand-color1); color: var(--jp-ui-inverse-font-color1); }
.rbee-badge[data-state='loading'] { background: var(--jp-warn-color1); color: var(--jp-ui-inverse-font-color1); }
.rbee-badge[data-state='failed'] { background: var(--jp-error-color1); color: var(--jp-ui-inverse-font-color1); }
.rbee-message { color: var(--jp-error-color1); font-size: var(--jp-ui-font-size0); overflow-wrap: anywhere; }
.rbee-error {
  color: var(--jp-error-color1);
  background: var(--jp-error-color3);
  border-left: 3px solid var(--jp-error-color1);
  padding: 4px 6px;
  margin-top: 4px;
  overflow-wrap: anywhere;
}
.rbee-download-form { flex-wrap: nowrap; margin-bottom: 4px; }
.rbee-ref { flex: 1; min-width: 0; }
.rbee-field { display: flex; flex-direction: column; gap: 2px; margin: 4px 0; color: var(--jp-ui-font-color2); }
.rbee-field.rbee-inline { flex-direction: row; align-items: center; gap: 4px; margin: 0; }
.rbee-max-tokens { width: 5em; }
.rbee-prompt { width: 100%; box-sizing: border-box; resize: vertical; font-family: var(--jp-code-font-family); }
.rbee-output {
  white-space: pre-wrap;
  font-family: var(--jp-code-font-family);
  font-size: var(--jp-code-font-size);
  background: var(--jp-layout-color2);
  border: var(--jp-border-width) solid var(--jp-border-color2);
  min-height: 3em;
  padding: 4px;
  margin: 6px 0 2px;
}
.rbee-stats { color: var(--jp-ui-font-color2); font-size: var(--jp-ui-font-size0); }
.rbee-load-form .rbee-field select { width: 100%; }
.rbee-panel [hidden] { display: none !important; }
.rbee-badges { display: flex; gap: 4px; align-items: center; }
.rbee-kind { border: var(--jp-border-width) solid var(--jp-border-color1); background: transparent; color: var(--jp-ui-font-color2); }
.rbee-kind[data-kind='embedding'] { border-color: var(--jp-info-color1); color: var(--jp-info-color1); }
.rbee-shared { border: var(--jp-border-width) solid var(--jp-brand-color1); background: transparent; color: var(--jp-brand-color1); }
.rbee-load { font-variant-numeric: tabular-nums; margin-top: 2px; }
`,""]),o.d(e,{},{A:i})},719(r){r.exports=function(r){var e=[];return e.toString=function(){return this.map(function(e){var o="",a=void 0!==e[5];return e[4]&&(o+="@supports (".concat(e[4],") {")),e[2]&&(o+="@media ".concat(e[2]," {")),a&&(o+="@layer".concat(e[5].length>0?" ".concat(e[5]):""," {")),o+=r(e),a&&(o+="}"),e[2]&&(o+="}"),e[4]&&(o+="}"),o}).join("")},e.i=function(r,o,a,t,n){"string"==typeof r&&(r=[[null,r,void 0]]);var i={};if(a)for(var l=0;l<this.length;l++){var p=this[l][0];null!=p&&(i[p]=!0)}for(var c=0;c<r.length;c++){var s=[].concat(r[c]);a&&i[s[0]]||(void 0!==n&&(void 0===s[5]||(s[1]="@layer".concat(s[5].length>0?" ".concat(s[5]):""," {").concat(s[1],"}")),s[5]=n),o&&(s[2]&&(s[1]="@media ".concat(s[2]," {").concat(s[1],"}")),s[2]=o),t&&(s[4]?(s[1]="@supports (".concat(s[4],") {").concat(s[1],"}"),s[4]=t):s[4]="".concat(t)),e.push(s))}},e}},126(r){r.exports=function(r){return r[1]}},559(r){var e=[];function o(r){for(var o=-1,a=0;a<e.length;a++)if(e[a].identifier===r){o=a;break}return o}function a(r,a){for(var t={},n=[],i=0;i<r.length;i++){var l=r[i],p=a.base?l[0]+a.base:l[0],c=t[p]||0,s="".concat(p," ").concat(c);t[p]=c+1;var d=o(s),u={css:l[1],media:l[2],sourceMap:l[3],supports:l[4],layer:l[5]};if(-1!==d)e[d].references++,e[d].updater(u);else{var b=function(r,e){var o=e.domAPI(e);return o.update(r),function(e){e?(e.css!==r.css||e.media!==r.media||e.sourceMap!==r.sourceMap||e.supports!==r.supports||e.layer!==r.layer)&&o.update(r=e):o.remove()}}(u,a);a.byIndex=i,e.splice(i,0,{identifier:s,updater:b,references:1})}n.push(s)}return n}r.exports=function(r,t){var n=a(r=r||[],t=t||{});return function(r){r=r||[];for(var i=0;i<n.length;i++){var l=o(n[i]);e[l].references--}for(var p=a(r,t),c=0;c<n.length;c++){var s=o(n[c]);0===e[s].references&&(e[s].updater(),e.splice(s,1))}n=p}}},672(r){var e={};r.exports=function(r,o){var a=function(r){if(void 0===e[r]){var o=document.querySelector(r);if(window.HTMLIFrameElement&&o instanceof window.HTMLIFrameElement)try{o=o.contentDocument.head}catch(r){o=null}e[r]=o}return e[r]}(r);if(!a)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");a.appendChild(o)}},691(r){r.exports=function(r){var e=document.createElement("style");return r.setAttributes(e,r.attributes),r.insert(e,r.options),e}},215(r,e,o){r.exports=function(r){var e=o.nc;e&&r.setAttribute("nonce",e)}},204(r){r.exports=function(r){if("u"<typeof document)return{update:function(){},remove:function(){}};var e=r.insertStyleElement(r);return{update:function(o){var a,t,n;a="",o.supports&&(a+="@supports (".concat(o.supports,") {")),o.media&&(a+="@media ".concat(o.media," {")),(t=void 0!==o.layer)&&(a+="@layer".concat(o.layer.length>0?" ".concat(o.layer):""," {")),a+=o.css,t&&(a+="}"),o.media&&(a+="}"),o.supports&&(a+="}"),(n=o.sourceMap)&&"u">typeof btoa&&(a+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(n))))," */")),r.styleTagTransform(a,e,r.options)},remove:function(){var r;null===(r=e).parentNode||r.parentNode.removeChild(r)}}}},696(r){r.exports=function(r,e){if(e.styleSheet)e.styleSheet.cssText=r;else{for(;e.firstChild;)e.removeChild(e.firstChild);e.appendChild(document.createTextNode(r))}}},959(r,e,o){var a=o(559),t=o.n(a),n=o(204),i=o.n(n),l=o(672),p=o.n(l),c=o(215),s=o.n(c),d=o(691),u=o.n(d),b=o(696),f=o.n(b),v=o(851),m={};m.styleTagTransform=f(),m.setAttributes=s(),m.insert=p().bind(null,"head"),m.domAPI=i(),m.insertStyleElement=u(),t()(v.A,m),v.A&&v.A.locals&&v.A.locals}}]);